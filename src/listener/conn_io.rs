//! The byte stream under hyper's connection: what hyper reads first (bytes
//! already taken off the socket, by protocol detection or by a parked
//! connection waking up), and the hold that lets a connection be taken back
//! from hyper only when hyper is idle.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The preface every HTTP/2 connection with prior knowledge starts with
/// (RFC 9113, 3.4); anything else is HTTP/1.x.
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// What a connection speaks, from its first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    Http1,
    Http2,
}

/// The protocol of bytes read so far: `None` while they are a strict
/// beginning of the HTTP/2 preface (more are needed to tell).
pub(super) fn protocol_of(head: &[u8]) -> Option<Protocol> {
    let n = head.len().min(H2_PREFACE.len());
    if head[..n] != H2_PREFACE[..n] {
        Some(Protocol::Http1)
    } else if n == H2_PREFACE.len() {
        Some(Protocol::Http2)
    } else {
        None
    }
}

/// Shared between a connection's task and the [`ConnIo`] hyper owns.
#[derive(Debug, Default)]
pub(super) struct Hold {
    /// Reads and writes answer `Pending` (without registering a waker: the
    /// task polls hyper once in this state and then clears it), and a
    /// shutdown is noted instead of done.
    holding: AtomicBool,
    /// hyper asked to shut the stream down while held.
    shutdown_asked: AtomicBool,
    /// hyper tried to read or write while held: it was in a message (a
    /// request body to drain, an answer to send).
    moved: AtomicBool,
    /// hyper's last write or flush found the socket full: bytes are not
    /// yet sent (a client not reading its answer), and hyper is not idle.
    write_blocked: AtomicBool,
    /// The connection's slot in its listener, given back with the last
    /// holder of this: the stream (here rather than in the connection's
    /// task, where it would take room while the connection is parked).
    _slot: Option<super::Slot>,
}

/// What hyper did while its stream was held.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Held {
    /// It asked for a shutdown without trying to move a byte: it was idle,
    /// between messages, with nothing buffered to write.
    Idle,
    /// It asked for a shutdown after trying to read or write: it ended the
    /// connection in a message (a request body it would not drain).
    EndedInMessage,
    /// It did not ask for a shutdown: it has more to do.
    Busy,
}

impl Hold {
    pub fn with_slot(slot: super::Slot) -> Hold {
        Hold {
            _slot: Some(slot),
            ..Hold::default()
        }
    }

    pub fn start(&self) {
        self.shutdown_asked.store(false, Ordering::Relaxed);
        self.moved.store(false, Ordering::Relaxed);
        self.holding.store(true, Ordering::Relaxed);
    }

    pub fn end(&self) -> Held {
        self.holding.store(false, Ordering::Relaxed);
        match (
            self.shutdown_asked.swap(false, Ordering::Relaxed),
            self.moved.swap(false, Ordering::Relaxed),
        ) {
            (true, false) => Held::Idle,
            (true, true) => Held::EndedInMessage,
            (false, _) => Held::Busy,
        }
    }

    /// Bytes hyper wrote are not sent yet (its last write or flush found
    /// the socket full).
    pub fn is_write_blocked(&self) -> bool {
        self.write_blocked.load(Ordering::Relaxed)
    }

    fn note_write<T>(&self, write: &Poll<T>) {
        self.write_blocked
            .store(write.is_pending(), Ordering::Relaxed);
    }

    fn is_holding(&self) -> bool {
        self.holding.load(Ordering::Relaxed)
    }

    /// A read or write while held: noted, and answered `Pending`.
    fn held_move(&self) -> bool {
        if self.is_holding() {
            self.moved.store(true, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// A connection's stream as hyper sees it: `unread` first, then `io`.
pub(super) struct ConnIo<I> {
    io: I,
    /// Boxed: a parked connection's task keeps the stream, and there is
    /// rarely anything unread (a `Bytes` inline is 32 bytes, the box 8).
    unread: Option<Box<Bytes>>,
    hold: Arc<Hold>,
}

impl<I> ConnIo<I> {
    pub fn new(io: I, hold: Arc<Hold>) -> Self {
        ConnIo {
            io,
            unread: None,
            hold,
        }
    }

    /// Puts `bytes` before whatever is still unread: they were read off
    /// this stream earlier and not consumed.
    pub fn unread(&mut self, bytes: Bytes) {
        if bytes.is_empty() {
            return;
        }
        match &mut self.unread {
            None => self.unread = Some(Box::new(bytes)),
            Some(unread) => {
                let mut joined = Vec::with_capacity(bytes.len() + unread.len());
                joined.extend_from_slice(&bytes);
                joined.extend_from_slice(unread);
                **unread = Bytes::from(joined);
            }
        }
    }

    pub fn has_unread(&self) -> bool {
        self.unread.is_some()
    }

    /// The hold hyper's use of this stream is judged by.
    pub fn hold(&self) -> &Arc<Hold> {
        &self.hold
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for ConnIo<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hold.held_move() {
            return Poll::Pending;
        }
        if let Some(unread) = &mut this.unread {
            let n = unread.len().min(buf.remaining());
            buf.put_slice(&unread[..n]);
            unread.advance(n);
            if unread.is_empty() {
                // Emptied, it would still hold its allocation (the bytes
                // that woke a parked connection, or hyper's whole read
                // buffer when given back), kept through the next park.
                this.unread = None;
            }
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for ConnIo<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold.held_move() {
            return Poll::Pending;
        }
        let write = Pin::new(&mut this.io).poll_write(cx, buf);
        this.hold.note_write(&write);
        write
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.hold.held_move() {
            return Poll::Pending;
        }
        let write = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.hold.note_write(&write);
        write
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // A TLS stream takes writes into its own buffer and blocks here
        // instead, when the socket is full.
        let flush = Pin::new(&mut this.io).poll_flush(cx);
        this.hold.note_write(&flush);
        flush
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if this.hold.is_holding() {
            this.hold.shutdown_asked.store(true, Ordering::Relaxed);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn the_protocol_is_told_from_the_first_bytes() {
        assert_eq!(protocol_of(b"GET / HTTP/1.1\r\n"), Some(Protocol::Http1));
        assert_eq!(protocol_of(b"P"), None);
        assert_eq!(protocol_of(b"PRI * HTTP/2.0\r\n"), None);
        assert_eq!(protocol_of(b"POST /v2 HTTP/1.1"), Some(Protocol::Http1));
        assert_eq!(protocol_of(H2_PREFACE), Some(Protocol::Http2));
        assert_eq!(
            protocol_of(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\x12\x04"),
            Some(Protocol::Http2)
        );
    }

    #[tokio::test]
    async fn unread_bytes_come_first_in_order_then_the_stream() {
        let (client, server) = tokio::io::duplex(64);
        let mut io = ConnIo::new(server, Arc::default());
        io.unread(Bytes::from_static(b"cd"));
        io.unread(Bytes::from_static(b"ab"));
        io.unread(Bytes::new());
        assert!(io.has_unread());
        let mut client = client;
        client.write_all(b"ef").await.unwrap();
        drop(client);
        let mut all = Vec::new();
        io.read_to_end(&mut all).await.unwrap();
        assert_eq!(all, b"abcdef");
        assert!(!io.has_unread());
    }

    #[tokio::test]
    async fn unread_bytes_once_read_free_the_buffer_they_came_from() {
        /// hyper's read buffer, as `into_parts` gives it back: a few
        /// unparsed bytes in a big allocation.
        struct ReadBuffer(Vec<u8>, Arc<AtomicBool>);
        impl AsRef<[u8]> for ReadBuffer {
            fn as_ref(&self) -> &[u8] {
                &self.0
            }
        }
        impl Drop for ReadBuffer {
            fn drop(&mut self) {
                self.1.store(true, Ordering::Relaxed);
            }
        }
        let freed = Arc::new(AtomicBool::new(false));
        let mut buffer = Bytes::from_owner(ReadBuffer(vec![b'x'; 8192], freed.clone()));
        let (_client, server) = tokio::io::duplex(64);
        let mut io = ConnIo::new(server, Arc::default());
        io.unread(buffer.split_to(5));
        drop(buffer);
        let mut read = [0u8; 3];
        io.read_exact(&mut read).await.unwrap();
        assert!(!freed.load(Ordering::Relaxed), "freed with bytes unread");
        io.read_exact(&mut read[..2]).await.unwrap();
        assert!(
            freed.load(Ordering::Relaxed),
            "the stream kept the buffer after its last unread byte was read"
        );
    }

    #[tokio::test]
    async fn a_held_stream_moves_no_bytes_and_notes_a_shutdown() {
        let (mut client, server) = tokio::io::duplex(64);
        let hold = Arc::new(Hold::default());
        let mut io = ConnIo::new(server, hold.clone());
        client.write_all(b"x").await.unwrap();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        hold.start();
        assert!(
            Pin::new(&mut io).poll_flush(&mut cx).is_ready(),
            "flushes pass"
        );
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(hold.end(), Held::Idle, "a shutdown and nothing else");
        assert_eq!(hold.end(), Held::Busy, "noted once");

        hold.start();
        let mut buf = [0u8; 4];
        let mut read = ReadBuf::new(&mut buf);
        assert!(Pin::new(&mut io).poll_read(&mut cx, &mut read).is_pending());
        assert!(Pin::new(&mut io).poll_shutdown(&mut cx).is_ready());
        assert_eq!(hold.end(), Held::EndedInMessage, "a read, then a shutdown");

        hold.start();
        assert!(Pin::new(&mut io).poll_write(&mut cx, b"y").is_pending());
        assert_eq!(hold.end(), Held::Busy, "a write and no shutdown");
        // Not shut down for real: both directions still work.
        io.write_all(b"z").await.unwrap();
        let mut got = [0u8; 1];
        client.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"z");
        io.read_exact(&mut got).await.unwrap();
        assert_eq!(&got, b"x");
    }
}
