//! The latency histogram every run records (microseconds, 3 significant digits) and its
//! interchange form (HdrHistogram V2 deflate, base64), shared by loadgen and the run store.

use hdrhistogram::serialization::{Serializer, V2DeflateSerializer};
use hdrhistogram::Histogram;

/// Highest trackable value: one hour in microseconds.
pub const MAX_US: u64 = 3_600_000_000;

/// A fresh latency histogram in microseconds.
pub fn new_hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_US, 3).expect("valid bounds")
}

/// Base64 of the V2-deflate serialized histogram (the HdrHistogram interchange format).
pub fn encode_hist(h: &Histogram<u64>) -> String {
    use base64::Engine;
    let mut buf = Vec::new();
    V2DeflateSerializer::new()
        .serialize(h, &mut buf)
        .expect("serializing to memory");
    base64::engine::general_purpose::STANDARD.encode(buf)
}

/// Inverse of [`encode_hist`].
pub fn decode_hist(s: &str) -> Result<Histogram<u64>, String> {
    use base64::Engine;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(s)
        .map_err(|e| e.to_string())?;
    hdrhistogram::serialization::Deserializer::new()
        .deserialize(&mut std::io::Cursor::new(bytes))
        .map_err(|e| format!("{e:?}"))
}
