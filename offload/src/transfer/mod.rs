//! Prefill→decode transfer (FlowKV): the parts of the transfer engine that own memory and do
//! not need the network (the frames and sockets are in `kvtier-wire` and `kvtier`).
//!
//! - [`segments`]: the receiver's segment allocator, contiguous space for a whole transfer
//!   reserved up front (best fit, coalescing on free, bounded reservation time);
//! - [`region`]: the host memory it carves, written piece by piece straight from the socket and
//!   frozen into shared views that the host tier adopts as chunks.

pub mod region;
pub mod segments;

pub use region::{FrozenSegment, PieceMut, RegionError, SegmentWriter, TransferRegion};
pub use segments::{Segment, SegmentAllocator, SegmentError, SegmentStats};
