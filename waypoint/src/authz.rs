//! L7 authorization (to be written).
