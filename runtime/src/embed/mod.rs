//! The embeddings service: what `POST /v1/embeddings` calls once a request is parsed and
//! tokenized. It admits the request ([`crate::admission`]), queues its inputs for the
//! [`batcher`] (an actor over the pure [`state::State`]), and waits for the device [`workers`]
//! to answer every input. The HTTP layer never sees queues or batches.

pub mod batcher;
pub mod job;
pub mod state;
pub mod workers;

use crate::admission::{Admission, AdmissionError};
use batcher::Batcher;
use job::{Failure, Item, Outcome, Slot};
use profiles::Profile;
use state::Entry;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Why an embeddings request got no vectors.
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    /// Refused before queueing (rate limit, queue full, larger than the queue).
    #[error(transparent)]
    Admission(#[from] AdmissionError),
    /// The request's deadline passed while it was queued; it was not computed.
    #[error("request_timeout ({}) passed while the request was queued; it was not computed", profiles::format_duration(*.0))]
    Expired(Duration),
    /// Its batch failed or panicked (the message names the device).
    #[error("{0}")]
    Batch(String),
    /// The server stopped before computing it.
    #[error("the server is shutting down and stopped before computing this request; retry on another replica")]
    Stopped,
}

/// Request-level embeddings: admission, queueing, and the wait for every input's vector.
#[derive(Clone)]
pub struct EmbedService {
    batcher: Batcher,
    admission: Arc<Admission>,
}

impl EmbedService {
    /// A service over a running batcher and the server's admission.
    pub fn new(batcher: Batcher, admission: Arc<Admission>) -> Self {
        EmbedService { batcher, admission }
    }

    /// Embeds already-tokenized inputs under the live profile `p`; `arrived` starts the
    /// request's `request_timeout`.
    pub async fn embed(
        &self,
        ids: Vec<Vec<u32>>,
        p: &Profile,
        arrived: Instant,
    ) -> Result<Outcome, EmbedError> {
        self.admission.check_rate(p)?;
        self.admission.reserve(ids.len(), p).await?;
        let (slot, rx) = Slot::new(ids.len());
        let enqueued = Instant::now();
        let deadline = arrived + p.request_timeout;
        let entries: Vec<Entry<Item>> = ids
            .into_iter()
            .enumerate()
            .map(|(index, ids)| Entry {
                tokens: ids.len(),
                enqueued,
                deadline,
                payload: Item {
                    ids,
                    index,
                    slot: slot.clone(),
                },
            })
            .collect();
        let n = entries.len();
        if self.batcher.enqueue(entries).is_err() {
            self.admission.space.release(n);
            return Err(EmbedError::Stopped);
        }
        match rx.await {
            Ok(Ok(o)) => Ok(o),
            Ok(Err(Failure::Expired)) => Err(EmbedError::Expired(p.request_timeout)),
            Ok(Err(Failure::Batch(msg))) => Err(EmbedError::Batch(msg)),
            Ok(Err(Failure::Shutdown)) | Err(_) => Err(EmbedError::Stopped),
        }
    }
}
