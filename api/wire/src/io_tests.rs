//! Tests of the async paths: vectored writes under partial progress, frames streamed over pipes
//! with the payload left in the stream, EOF mid-frame, and stall timeouts (on paused time, so
//! they are fast and deterministic).

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use super::tests::meta;
use super::*;

const STALL: Duration = Duration::from_millis(200);

/// A writer that takes at most `max` bytes per call, to force partial vectored writes.
struct Trickle {
    out: Vec<u8>,
    max: usize,
    calls: usize,
}

impl AsyncWrite for Trickle {
    fn poll_write(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        b: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let n = b.len().min(self.max);
        self.out.extend_from_slice(&b[..n]);
        self.calls += 1;
        Poll::Ready(Ok(n))
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        _: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let mut left = self.max;
        for b in bufs {
            let n = b.len().min(left);
            self.out.extend_from_slice(&b[..n]);
            left -= n;
            if left == 0 {
                break;
            }
        }
        self.calls += 1;
        Poll::Ready(Ok(self.max - left))
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[tokio::test]
async fn vectored_writes_survive_partial_writes() {
    let chunks = [
        Bytes::from_static(b"abcdefghij"),
        Bytes::new(),
        Bytes::from(vec![7u8; 33]),
    ];
    let head = frame_head(Opcode::GetOk, 3, 0, &GetOkHeader { entries: vec![] }, 43).unwrap();
    let mut w = Trickle {
        out: Vec::new(),
        max: 7,
        calls: 0,
    };
    write_frame(&mut w, &head, &chunks).await.unwrap();
    let mut want = head.clone();
    chunks.iter().for_each(|c| want.extend_from_slice(c));
    assert_eq!(w.out, want);
    assert_eq!(
        w.calls,
        want.len().div_ceil(7),
        "every call must make full progress"
    );
}

#[tokio::test]
async fn frames_stream_over_a_pipe_with_payload_left_in_place() {
    let (mut a, mut b) = tokio::io::duplex(64);
    let payload: Vec<u8> = (0..5000u32).map(|i| i as u8).collect();
    let sent = payload.clone();
    let writer = tokio::spawn(async move {
        let put = PutHeader {
            key: 5,
            meta: meta(FIDELITY_EXACT, None),
        };
        let head = frame_head(Opcode::Put, 1, 0, &put, sent.len() as u64).unwrap();
        let halves: [&[u8]; 2] = [&sent[..100], &sent[100..]];
        write_frame(&mut a, &head, &halves).await.unwrap();
        write_frame::<_, &[u8]>(&mut a, &error_frame(2, ErrorCode::Busy, "later"), &[])
            .await
            .unwrap();
        // Dropping `a` closes the pipe: a clean EOF between frames.
    });
    let limits = Limits::default();
    let mut buf = AlignedVec::new();
    let pre = read_frame_head(&mut b, &limits, STALL, &mut buf)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        (pre.opcode, pre.request_id, pre.payload_len),
        (Opcode::Put, 1, 5000)
    );
    assert_eq!(
        access_header::<PutHeader>(pre.opcode, &buf)
            .unwrap()
            .key
            .to_native(),
        5
    );
    let mut slot = vec![0u8; pre.payload_len as usize];
    read_payload_into(&mut b, &mut slot, STALL).await.unwrap();
    assert_eq!(slot, payload);
    let pre = read_frame_head(&mut b, &limits, STALL, &mut buf)
        .await
        .unwrap()
        .unwrap();
    assert_eq!((pre.opcode, pre.request_id), (Opcode::Error, 2));
    assert!(
        read_frame_head(&mut b, &limits, STALL, &mut buf)
            .await
            .unwrap()
            .is_none()
    );
    writer.await.unwrap();
}

/// Feeds `bytes` through a pipe whose writer then closes, and returns what the reader saw.
async fn read_from(bytes: Vec<u8>) -> Result<Option<Preamble>, WireError> {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    a.write_all(&bytes).await.unwrap();
    drop(a);
    read_frame_head(&mut b, &Limits::default(), STALL, &mut AlignedVec::new()).await
}

#[tokio::test]
async fn eof_mid_frame_is_truncated() {
    let frame = frame_head(
        Opcode::Delete,
        4,
        0,
        &DeleteHeader {
            keys: vec![1, 2, 3],
        },
        0,
    )
    .unwrap();
    assert!(matches!(
        read_from(frame[..1].to_vec()).await,
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        read_from(frame[..31].to_vec()).await,
        Err(WireError::Truncated)
    ));
    assert!(matches!(
        read_from(frame[..40].to_vec()).await,
        Err(WireError::Truncated)
    ));
    assert!(read_from(frame.clone()).await.unwrap().is_some());
    assert!(read_from(Vec::new()).await.unwrap().is_none());

    let mut bad = frame.clone();
    bad[0] = b'k';
    assert!(matches!(read_from(bad).await, Err(WireError::BadMagic)));
    let mut bad = frame;
    *bad.last_mut().unwrap() ^= 1;
    assert!(matches!(
        read_from(bad).await,
        Err(WireError::HeaderChecksum)
    ));

    let (mut a, mut b) = tokio::io::duplex(64);
    a.write_all(&[1, 2, 3]).await.unwrap();
    drop(a);
    let mut dst = [0u8; 4];
    assert!(matches!(
        read_payload_into(&mut b, &mut dst, STALL).await,
        Err(WireError::Truncated)
    ));
}

#[tokio::test]
async fn discarded_payload_leaves_the_stream_at_the_next_frame() {
    let (mut a, mut b) = tokio::io::duplex(1 << 16);
    a.write_all(&[9u8; 20_000]).await.unwrap();
    a.write_all(&frame_head(Opcode::Stats, 6, 0, &StatsHeader {}, 0).unwrap())
        .await
        .unwrap();
    drop(a);
    discard_payload(&mut b, 20_000, STALL).await.unwrap();
    let mut buf = AlignedVec::new();
    let pre = read_frame_head(&mut b, &Limits::default(), STALL, &mut buf)
        .await
        .unwrap();
    assert_eq!(
        pre.map(|p| (p.opcode, p.request_id)),
        Some((Opcode::Stats, 6))
    );
    assert!(matches!(
        discard_payload(&mut b, 1, STALL).await,
        Err(WireError::Truncated)
    ));
}

#[tokio::test(start_paused = true)]
async fn stalled_sender_times_out_but_idle_connection_does_not() {
    let frame = frame_head(Opcode::Delete, 4, 0, &DeleteHeader { keys: vec![1] }, 0).unwrap();
    let limits = Limits::default();

    // Stalls mid-preamble: the writer stays open, so this is a stall, not EOF.
    let (mut a, mut b) = tokio::io::duplex(1024);
    a.write_all(&frame[..10]).await.unwrap();
    let r = read_frame_head(&mut b, &limits, STALL, &mut AlignedVec::new()).await;
    assert!(matches!(r, Err(WireError::Timeout)), "{r:?}");

    // Stalls mid-header.
    let (mut a2, mut b2) = tokio::io::duplex(1024);
    a2.write_all(&frame[..PREAMBLE_LEN + 3]).await.unwrap();
    let r = read_frame_head(&mut b2, &limits, STALL, &mut AlignedVec::new()).await;
    assert!(matches!(r, Err(WireError::Timeout)), "{r:?}");

    // Stalls mid-payload.
    let (mut a3, mut b3) = tokio::io::duplex(1024);
    a3.write_all(&[0u8; 10]).await.unwrap();
    let mut dst = [0u8; 20];
    let r = read_payload_into(&mut b3, &mut dst, STALL).await;
    assert!(matches!(r, Err(WireError::Timeout)), "{r:?}");

    // Idle between frames for far longer than the stall timeout, then a frame: accepted.
    let (mut a4, mut b4) = tokio::io::duplex(1024);
    let sender = tokio::spawn(async move {
        tokio::time::sleep(STALL * 50).await;
        a4.write_all(&frame).await.unwrap();
        a4
    });
    let pre = read_frame_head(&mut b4, &limits, STALL, &mut AlignedVec::new())
        .await
        .unwrap();
    assert_eq!(pre.map(|p| p.request_id), Some(4));
    drop((a, a2, a3, sender.await.unwrap()));
}

#[tokio::test(start_paused = true)]
async fn slow_but_steady_sender_is_not_cut_off() {
    let frame = frame_head(Opcode::Delete, 8, 0, &DeleteHeader { keys: vec![1, 2] }, 0).unwrap();
    let (mut a, mut b) = tokio::io::duplex(1024);
    let sent = frame.clone();
    let sender = tokio::spawn(async move {
        // Each byte arrives within the stall timeout, the whole frame takes far longer.
        for byte in sent {
            tokio::time::sleep(STALL / 2).await;
            a.write_all(&[byte]).await.unwrap();
        }
        a
    });
    let pre = read_frame_head(&mut b, &Limits::default(), STALL, &mut AlignedVec::new()).await;
    assert_eq!(pre.unwrap().map(|p| p.request_id), Some(8));
    drop(sender.await.unwrap());
}
