//! The two transports of the data plane behind one reader and one writer type, plus the
//! descriptor passing (`SCM_RIGHTS`) only Unix sockets can do.

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::pin::Pin;
use std::task::{Context, Poll};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::{tcp, unix};

/// Most descriptors passed in one message (the kernel allows 253).
pub const MAX_FDS: usize = 200;

/// Read half of a data-plane connection.
pub enum Reader {
    Tcp(tcp::OwnedReadHalf),
    Unix(unix::OwnedReadHalf),
}

/// Write half of a data-plane connection.
pub enum Writer {
    Tcp(tcp::OwnedWriteHalf),
    Unix(unix::OwnedWriteHalf),
}

impl Reader {
    pub fn is_unix(&self) -> bool {
        matches!(self, Reader::Unix(_))
    }

    /// Receives the one-byte message that carries descriptors right after a frame. The frame
    /// reader never reads past a frame, so this byte is the next thing in the stream.
    pub async fn recv_fds(&mut self) -> std::io::Result<Vec<OwnedFd>> {
        let Reader::Unix(r) = self else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "descriptor passing needs the unix socket",
            ));
        };
        let stream: &tokio::net::UnixStream = r.as_ref();
        loop {
            stream.readable().await?;
            let res = stream.try_io(Interest::READABLE, || {
                let mut byte = [0u8; 1];
                let mut space =
                    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut anc = RecvAncillaryBuffer::new(&mut space);
                let msg = rustix::net::recvmsg(
                    stream.as_fd(),
                    &mut [IoSliceMut::new(&mut byte)],
                    &mut anc,
                    RecvFlags::CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                if msg.bytes == 0 {
                    return Err(std::io::Error::from(std::io::ErrorKind::UnexpectedEof));
                }
                let mut fds = Vec::new();
                for m in anc.drain() {
                    if let RecvAncillaryMessage::ScmRights(it) = m {
                        fds.extend(it);
                    }
                }
                Ok(fds)
            });
            match res {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                other => return other,
            }
        }
    }
}

impl Writer {
    /// Sends one byte carrying `fds` (at most [`MAX_FDS`]).
    pub async fn send_fds(&mut self, fds: &[BorrowedFd<'_>]) -> std::io::Result<()> {
        let Writer::Unix(w) = self else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "descriptor passing needs the unix socket",
            ));
        };
        if fds.len() > MAX_FDS {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "too many descriptors in one message",
            ));
        }
        let stream: &tokio::net::UnixStream = w.as_ref();
        loop {
            stream.writable().await?;
            let res = stream.try_io(Interest::WRITABLE, || {
                let mut space =
                    vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
                let mut anc = SendAncillaryBuffer::new(&mut space);
                if !anc.push(SendAncillaryMessage::ScmRights(fds)) {
                    return Err(std::io::Error::other("descriptor message does not fit"));
                }
                rustix::net::sendmsg(
                    stream.as_fd(),
                    &[IoSlice::new(&[0u8])],
                    &mut anc,
                    SendFlags::NOSIGNAL,
                )
                .map_err(std::io::Error::from)
            });
            match res {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
                Ok(_) => return Ok(()),
            }
        }
    }
}

impl AsyncRead for Reader {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Reader::Tcp(r) => Pin::new(r).poll_read(cx, buf),
            Reader::Unix(r) => Pin::new(r).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Writer {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_write(cx, buf),
            Writer::Unix(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            Writer::Unix(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_flush(cx),
            Writer::Unix(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Writer::Tcp(w) => Pin::new(w).poll_shutdown(cx),
            Writer::Unix(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}
