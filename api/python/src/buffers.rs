//! Byte views of Python objects that export the buffer protocol (bytes, bytearray, memoryview,
//! numpy arrays; torch tensors through `Tensor.numpy()`), so puts read and `get_into` writes the
//! caller's memory in place instead of copying it into Python `bytes` first.
//!
//! This is the crate's only `unsafe`, and it has to be: the buffer protocol hands over a raw
//! pointer and length. The view holds the exported buffer (`PyBuffer_Release` on drop), which
//! keeps the memory alive and unresizable (numpy and bytearray refuse to resize while exported).
//! The GIL is released while the view is read or written, as CPython's own `socket.sendall`
//! and `socket.recv_into` do: the caller must not mutate the object from another thread during
//! the call.

use pyo3::buffer::PyUntypedBuffer;
use pyo3::exceptions::{PyBufferError, PyValueError};
use pyo3::prelude::*;

/// A C-contiguous buffer's bytes.
pub(crate) struct BytesView {
    buf: PyUntypedBuffer,
}

impl BytesView {
    /// Views `obj`; `writable` asks for a buffer that is not read-only.
    pub(crate) fn new(obj: &Bound<'_, PyAny>, writable: bool) -> PyResult<BytesView> {
        let buf = PyUntypedBuffer::get(obj)?;
        if !buf.is_c_contiguous() {
            return Err(PyValueError::new_err(
                "buffer must be C-contiguous (call numpy.ascontiguousarray or Tensor.contiguous)",
            ));
        }
        if writable && buf.readonly() {
            return Err(PyBufferError::new_err("buffer is read-only"));
        }
        Ok(BytesView { buf })
    }

    pub(crate) fn len(&self) -> usize {
        self.buf.len_bytes()
    }

    /// The buffer's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        let len = self.len();
        if len == 0 {
            return &[];
        }
        // SAFETY: the buffer is exported for the lifetime of `self.buf` (held by `self`), it is
        // C-contiguous, so `len_bytes` bytes from `buf_ptr` are the object's memory, and the
        // pointer is non-null for a non-empty buffer. Mutation during the call is excluded by
        // the module's contract (above).
        unsafe { std::slice::from_raw_parts(self.buf.buf_ptr() as *const u8, len) }
    }

    /// The buffer's bytes, writable (the view was made with `writable`).
    pub(crate) fn bytes_mut(&mut self) -> &mut [u8] {
        let len = self.len();
        if len == 0 || self.buf.readonly() {
            return &mut [];
        }
        // SAFETY: as in `bytes`; the exporter said the memory is writable, and `&mut self`
        // makes this the only Rust reference to it.
        unsafe { std::slice::from_raw_parts_mut(self.buf.buf_ptr() as *mut u8, len) }
    }
}
