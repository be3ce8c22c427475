//! Prefill→decode transfer (FlowKV): the parts of the transfer engine that do not need the
//! network.
//!
//! - [`segments`]: the receiver's segment allocator, contiguous space for a whole transfer
//!   reserved up front (best fit, coalescing on free, bounded reservation time).

pub mod segments;

pub use segments::{Segment, SegmentAllocator, SegmentError, SegmentStats};
