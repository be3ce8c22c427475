//! Segment files: append-only files of records, positioned I/O on them, and the recovery scan.
//!
//! All I/O is positioned (`pwritev`/`pread`), so readers never share a file cursor and need no
//! lock; appends are serialised by the tier's writer lock, which owns each segment's end.

use std::fs::{File, OpenOptions};
use std::io::IoSlice;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use kvtier_cache::{CacheError, Result};

use super::record::{HEADER_LEN, Header, MAGIC, RecordKind};

/// File name suffix of segment files.
const SEGMENT_SUFFIX: &str = ".seg";
/// Payloads from this size up are read in pieces, checksummed while the next piece is read.
const PIPELINED_READ_BYTES: usize = 8 << 20;
const READ_PIECE_BYTES: usize = 2 << 20;
/// How far the recovery scan reads at a time while looking for the next intact header.
const RESYNC_WINDOW: usize = 1 << 20;

/// One segment file.
pub struct Segment {
    pub id: u64,
    pub path: PathBuf,
    pub file: File,
    /// End of the last complete record; appends go here. Only the writer advances it.
    pub len: AtomicU64,
    /// Bytes of records the index points at (header + payload).
    pub live: AtomicU64,
    /// Tombstones in this segment; a segment holding any is not dropped blindly.
    pub tombstones: AtomicU64,
}

impl Segment {
    pub fn file_name(id: u64) -> String {
        format!("{id:016}{SEGMENT_SUFFIX}")
    }

    /// The id of a segment file name, or `None` for other files.
    pub fn parse_name(name: &str) -> Option<u64> {
        let digits = name.strip_suffix(SEGMENT_SUFFIX)?;
        if digits.len() != 16 || !digits.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        digits.parse().ok()
    }

    /// Creates a new, empty segment file (fails if it exists).
    pub fn create(dir: &Path, id: u64) -> Result<Segment> {
        let path = dir.join(Self::file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .map_err(|e| CacheError::io(format!("create segment {}", path.display()), e))?;
        Ok(Segment::from_file(id, path, file, 0))
    }

    /// Opens an existing segment for reading and appending.
    pub fn open(dir: &Path, id: u64) -> Result<Segment> {
        let path = dir.join(Self::file_name(id));
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| CacheError::io(format!("open segment {}", path.display()), e))?;
        let len = file
            .metadata()
            .map_err(|e| CacheError::io(format!("stat segment {}", path.display()), e))?
            .len();
        Ok(Segment::from_file(id, path, file, len))
    }

    fn from_file(id: u64, path: PathBuf, file: File, len: u64) -> Segment {
        Segment {
            id,
            path,
            file,
            len: AtomicU64::new(len),
            live: AtomicU64::new(0),
            tombstones: AtomicU64::new(0),
        }
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    /// Writes `header` and `payload` at `offset` with one vectored positioned write (looping
    /// only on short writes). On failure the bytes past `offset` are cut off again, best effort,
    /// so a half-written record does not linger in front of the next append.
    pub fn write_record(&self, offset: u64, header: &[u8], payload: &[u8]) -> Result<()> {
        let total = header.len() + payload.len();
        let mut done = 0usize;
        while done < total {
            let slices: [IoSlice<'_>; 2] = if done < header.len() {
                [IoSlice::new(&header[done..]), IoSlice::new(payload)]
            } else {
                [
                    IoSlice::new(&payload[done - header.len()..]),
                    IoSlice::new(&[]),
                ]
            };
            match rustix::io::pwritev(&self.file, &slices, offset + done as u64) {
                Ok(0) => {
                    let _ = self.file.set_len(offset);
                    return Err(self.io_error("write", std::io::ErrorKind::WriteZero.into()));
                }
                Ok(n) => done += n,
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => {
                    let _ = self.file.set_len(offset);
                    return Err(self.io_error("write", e.into()));
                }
            }
        }
        Ok(())
    }

    /// Reads exactly `buf.len()` bytes at `offset` with positioned reads.
    pub fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_error("read", e))
    }

    /// Reads `len` payload bytes at `offset` into a new buffer and returns them with their
    /// CRC32C. Large payloads are read in pieces while a helper thread checksums the pieces
    /// already read, so the check costs little more than the read; every piece lands directly
    /// in the returned buffer.
    pub fn read_checked(&self, offset: u64, len: usize) -> Result<(Vec<u8>, u32)> {
        let mut buf = vec![0u8; len];
        let crc = self.read_checked_into(offset, &mut buf)?;
        Ok((buf, crc))
    }

    /// Like [`Segment::read_checked`], into a caller's buffer (reused buffers skip the
    /// allocation and page faults of a fresh one).
    pub fn read_checked_into(&self, offset: u64, buf: &mut [u8]) -> Result<u32> {
        if buf.len() < PIPELINED_READ_BYTES {
            self.read_exact_at(buf, offset)?;
            return Ok(super::record::payload_checksum(buf));
        }
        std::thread::scope(|s| {
            let (tx, rx) = std::sync::mpsc::channel::<&[u8]>();
            let checksummer = s.spawn(move || rx.into_iter().fold(0u32, crc32c::crc32c_append));
            let mut at = offset;
            for piece in buf.chunks_mut(READ_PIECE_BYTES) {
                self.read_exact_at(piece, at)?;
                at += piece.len() as u64;
                let piece: &[u8] = piece;
                // The receiver lives until every sender is gone; a send cannot fail.
                let _ = tx.send(piece);
            }
            drop(tx);
            Ok::<u32, CacheError>(checksummer.join().expect("checksum thread"))
        })
    }

    /// Makes the segment's data durable.
    pub fn sync(&self) -> Result<()> {
        rustix::fs::fdatasync(&self.file).map_err(|e| self.io_error("fdatasync", e.into()))
    }

    /// Cuts the file back to `len` bytes.
    pub fn truncate(&self, len: u64) -> Result<()> {
        self.file
            .set_len(len)
            .map_err(|e| self.io_error("truncate", e))?;
        self.len.store(len, Ordering::Release);
        Ok(())
    }

    fn io_error(&self, what: &str, e: std::io::Error) -> CacheError {
        CacheError::io(format!("{what} segment {}", self.path.display()), e)
    }

    /// Reads and decodes the header at `offset`; `Ok(None)` when fewer than a header's bytes are
    /// left before `end`.
    pub fn read_header(&self, offset: u64, end: u64) -> Result<Option<Result<Header>>> {
        if offset + HEADER_LEN as u64 > end {
            return Ok(None);
        }
        let mut b = [0u8; HEADER_LEN];
        self.read_exact_at(&mut b, offset)?;
        Ok(Some(Header::decode(&b)))
    }

    /// Walks the records of the segment, up to its current length.
    ///
    /// An intact header whose payload runs past the end, or anything unreadable with no intact
    /// header after it, is a torn tail: the scan reports where the good prefix ends. A damaged
    /// header in the middle is skipped by searching for the next intact header. With
    /// `verify_payloads`, payload checksums are checked too and failing records are left out.
    /// An intact header of an unknown format version stops the scan with `UnsupportedVersion`.
    pub fn scan(&self, verify_payloads: bool) -> Result<ScanOutcome> {
        let end = self.len();
        let mut out = ScanOutcome {
            records: Vec::new(),
            good_end: 0,
            skipped_corrupt: 0,
        };
        let mut offset = 0u64;
        while offset < end {
            let header = match self.read_header(offset, end)? {
                None => break,
                Some(Ok(h)) => h,
                Some(Err(e @ CacheError::UnsupportedVersion { .. })) => return Err(e),
                Some(Err(_)) => match self.resync(offset + 1, end)? {
                    Some(next) => {
                        out.skipped_corrupt += 1;
                        out.good_end = next;
                        offset = next;
                        continue;
                    }
                    None => break,
                },
            };
            let record_end = offset + header.record_len();
            if record_end > end {
                break;
            }
            if verify_payloads
                && header.kind == RecordKind::Put
                && !self.payload_ok(&header, offset)?
            {
                // A failing last record is a write that never completed, not damage.
                if record_end == end {
                    break;
                }
                out.skipped_corrupt += 1;
            } else {
                out.records.push(ScannedRecord { offset, header });
            }
            offset = record_end;
            out.good_end = offset;
        }
        Ok(out)
    }

    /// Whether the payload of the record at `offset` matches its header checksum.
    pub fn payload_ok(&self, header: &Header, offset: u64) -> Result<bool> {
        let (_, crc) =
            self.read_checked(offset + HEADER_LEN as u64, header.payload_len as usize)?;
        Ok(crc == header.payload_crc)
    }

    /// The offset of the next intact header at or after `from`, if any.
    fn resync(&self, from: u64, end: u64) -> Result<Option<u64>> {
        let mut window = vec![0u8; RESYNC_WINDOW];
        let mut start = from;
        while start + HEADER_LEN as u64 <= end {
            let n = ((end - start) as usize).min(RESYNC_WINDOW);
            self.read_exact_at(&mut window[..n], start)?;
            for i in 0..n.saturating_sub(MAGIC.len() - 1) {
                if window[i..i + MAGIC.len()] != MAGIC {
                    continue;
                }
                let at = start + i as u64;
                match self.read_header(at, end)? {
                    Some(Ok(h)) if at + h.record_len() <= end => return Ok(Some(at)),
                    Some(Err(e @ CacheError::UnsupportedVersion { .. })) => return Err(e),
                    _ => {}
                }
            }
            // Overlap windows by a magic's length so a magic split across them is not missed.
            start += (n - (MAGIC.len() - 1)).max(1) as u64;
        }
        Ok(None)
    }
}

/// A record found by [`Segment::scan`].
pub struct ScannedRecord {
    pub offset: u64,
    pub header: Header,
}

/// What [`Segment::scan`] found.
pub struct ScanOutcome {
    pub records: Vec<ScannedRecord>,
    /// End of the last good record; anything after it is a torn tail.
    pub good_end: u64,
    /// Records whose header or payload failed its checks and were skipped.
    pub skipped_corrupt: u64,
}
