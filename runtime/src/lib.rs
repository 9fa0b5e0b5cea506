//! batchtune runtime: an HTTP embeddings server with dynamic batching over candle.
//!
//! The request path (see the README and `../shared/DESIGN.md`): [`api`] validates and tokenizes,
//! [`admission`] applies the rate limit and queue capacity, [`embed`] batches inputs from the live
//! profile and runs them on one model replica per device ([`model`]), and the reply carries
//! `X-Queue-Time` / `X-Inference-Time` headers.
#![warn(missing_docs)]

pub mod admission;
pub mod api;
pub mod bench;
pub mod embed;
pub mod generate;
#[cfg(feature = "test-hooks")]
pub mod hooks;
pub mod http;
pub mod metrics;
pub mod model;

/// The message a caught panic carried (`panic!` with a literal or a formatted string), or
/// "unknown panic": the batcher's workers, the engine and its output stage each catch panics
/// and report them to the requests they were serving.
pub(crate) fn panic_text(panic: &(dyn std::any::Any + Send)) -> String {
    panic
        .downcast_ref::<String>()
        .cloned()
        .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "unknown panic".into())
}

use admission::{Admission, QueueSpace};
use api::generate::GenEngine;
use api::{AppState, EmbedEngine, Engine, Family};
use embed::batcher::Batcher;
use embed::EmbedService;
use generate::{GenerateOptions, GenerateService};
use metrics::Metrics;
use model::lm::LoadedLm;
use model::LoadedModel;
use profiles::Profile;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use tokio::sync::watch;

/// Errors that stop the server from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The profile breaks a rule.
    #[error("invalid profile: {0}")]
    Profile(#[from] profiles::ProfileError),
    /// The model or a device cannot be used.
    #[error(transparent)]
    Model(#[from] model::ModelError),
    /// The address cannot be bound.
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        /// Requested address.
        addr: SocketAddr,
        /// Underlying error.
        source: std::io::Error,
    },
    /// The server failed while running.
    #[error("server error: {0}")]
    Serve(String),
    /// `--api-key ""`: an empty key would make an empty `X-API-Key` header a valid one.
    #[error("the API key is empty (give a non-empty --api-key, or none to serve without one)")]
    EmptyApiKey,
}

/// Everything `runtime serve` needs.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The (validated) profile to start with.
    pub profile: Profile,
    /// Address to bind; port 0 picks a free one.
    pub addr: SocketAddr,
    /// Guards `/v1/*` and `PUT /config` when set.
    pub api_key: Option<String>,
    /// Largest request body accepted (413 beyond).
    pub max_body_bytes: usize,
    /// A request body must arrive within this (408 beyond): a client sending a byte a second
    /// would otherwise hold its connection and buffer indefinitely.
    pub body_read_timeout: std::time::Duration,
    /// Connection limit and header read timeout.
    pub limits: http::ConnLimits,
    /// Generation steps a CUDA profiler records (`serve --cuda-profile-steps`), if any.
    pub profiler: Option<generate::engine::ProfilerWindow>,
    /// Whether generation engines issue a step before reading the previous step's tokens
    /// (`serve --step-overlap`; [`generate::engine::Overlap`]).
    pub overlap: generate::engine::Overlap,
    /// Test-only planted slowdown and faults (feature `test-hooks`).
    #[cfg(feature = "test-hooks")]
    pub hooks: hooks::TestHooks,
}

impl ServeOptions {
    /// Options for `profile` on `addr`, no API key, 8 MiB body limit.
    pub fn new(profile: Profile, addr: SocketAddr) -> Self {
        ServeOptions {
            profile,
            addr,
            api_key: None,
            max_body_bytes: 8 << 20,
            body_read_timeout: std::time::Duration::from_secs(30),
            limits: http::ConnLimits::default(),
            profiler: None,
            overlap: Default::default(),
            #[cfg(feature = "test-hooks")]
            hooks: Default::default(),
        }
    }
}

/// After the drain timeout: how long refused requests' answers and the devices' last batches get
/// before the server stops (so it exits within `drain_timeout` + 2 × this).
const ABORT_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Whether `p` can serve on this host: its model exists and its devices exist in this build
/// (what `serve` checks before binding, and `runtime validate` without `--rules-only`).
pub fn serves_here(p: &Profile) -> Result<(), RuntimeError> {
    model::resolve_model(&p.model)?;
    if !cfg!(feature = "cuda") {
        model::resolve_devices(&p.devices)?;
    }
    Ok(())
}

/// Waits for `done` (an engine finishing what it accepted) until `deadline`; past it, `abort`s
/// (the engine answers the rest 503) and waits [`ABORT_GRACE`] more. True when it drained.
async fn drain_or_abort<T>(
    mut done: tokio::task::JoinHandle<T>,
    deadline: tokio::time::Instant,
    abort: impl FnOnce(),
) -> bool {
    if tokio::time::timeout_at(deadline, &mut done).await.is_ok() {
        return true;
    }
    abort();
    let _ = tokio::time::timeout(ABORT_GRACE, done).await;
    false
}

/// A running server. Dropping it does not stop it: call [`Server::shutdown`] then [`Server::wait`].
pub struct Server {
    /// The bound address (with the real port when 0 was asked for).
    pub addr: SocketAddr,
    shutdown: watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), RuntimeError>>,
}

/// What serves requests once the model is loaded, kept so that shutdown can drain it.
enum Running {
    /// The embeddings batcher and its task.
    Embed(Batcher, tokio::task::JoinHandle<()>),
    /// The generation engines.
    Generate(Arc<GenerateService>),
}

type RunningSlot = Arc<Mutex<Option<Running>>>;

/// A loaded model of either family.
pub enum Loaded {
    /// An encoder (embeddings).
    Embed(LoadedModel),
    /// A decoder (generation).
    Generate(LoadedLm),
}

type Loader = Box<dyn FnOnce() -> Result<Loaded, RuntimeError> + Send>;

impl Server {
    /// Validates, binds, then loads the model in the background (`/health` says 503 until ready).
    pub async fn start(opts: ServeOptions) -> Result<Server, RuntimeError> {
        opts.profile.validate()?;
        // Fail fast on a bad model path or an unavailable device, before binding.
        serves_here(&opts.profile)?;
        let p = opts.profile.clone();
        let loader: Loader = Box::new(move || {
            Ok(match model::resolve_model(&p.model)? {
                model::ModelSource::Lm(_) => {
                    let lm = model::lm::load(&p.model, &p.devices, p.dtype)?;
                    generate::warm_up(&lm)?;
                    Loaded::Generate(lm)
                }
                _ => Loaded::Embed(model::load(&p.model, &p.devices, p.dtype)?),
            })
        });
        Self::start_with_loader(opts, loader).await
    }

    /// Like [`Server::start`] with a caller-supplied model; tests use it to inject a backend that
    /// fails on purpose.
    pub async fn start_with_model(
        opts: ServeOptions,
        model: LoadedModel,
    ) -> Result<Server, RuntimeError> {
        opts.profile.validate()?;
        Self::start_with_loader(opts, Box::new(move || Ok(Loaded::Embed(model)))).await
    }

    async fn start_with_loader(opts: ServeOptions, loader: Loader) -> Result<Server, RuntimeError> {
        if opts.api_key.as_deref().is_some_and(|k| k.trim().is_empty()) {
            return Err(RuntimeError::EmptyApiKey);
        }
        let listener = tokio::net::TcpListener::bind(opts.addr)
            .await
            .map_err(|source| RuntimeError::Bind {
                addr: opts.addr,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| RuntimeError::Bind {
            addr: opts.addr,
            source,
        })?;
        let metrics = Arc::new(Metrics::new());
        #[cfg(feature = "test-hooks")]
        let test_hooks = opts.hooks.clone();
        let space = Arc::new(QueueSpace::default());
        let (profiler, overlap) = (opts.profiler, opts.overlap);
        let (profile_tx, profile_rx) = watch::channel(Arc::new(opts.profile.clone()));
        let state = Arc::new(AppState {
            profile: profile_tx,
            engine: OnceLock::new(),
            metrics: metrics.clone(),
            api_key: opts.api_key.clone(),
            draining: Default::default(),
            max_body_bytes: opts.max_body_bytes,
            body_read_timeout: opts.body_read_timeout,
        });
        let (shutdown, mut shutdown_rx) = watch::channel(false);
        let running: RunningSlot = Default::default();
        let admission = Arc::new(Admission::new(space.clone()));
        let load_error: Arc<Mutex<Option<RuntimeError>>> = Default::default();

        // Load in the background so /health can answer 503 meanwhile.
        {
            let state = state.clone();
            let slot = running.clone();
            let load_error = load_error.clone();
            let shutdown = shutdown.clone();
            tokio::spawn(async move {
                let started = std::time::Instant::now();
                match tokio::task::spawn_blocking(loader).await {
                    Ok(Ok(Loaded::Embed(m))) => {
                        let devices = m.replicas.iter().map(|(l, _)| l.clone()).collect();
                        #[cfg(feature = "test-hooks")]
                        let replicas = {
                            let t = m.tokenizer.clone();
                            let armed = hooks::Armed::arm(&test_hooks.faults, |w| {
                                // Without the [CLS] … [SEP] the tokenizer adds.
                                let ids = t.encode(w).unwrap_or_default();
                                ids.get(1..ids.len().saturating_sub(1))
                                    .unwrap_or_default()
                                    .to_vec()
                            });
                            hooks::hook_embed(m.replicas, test_hooks.slowdown, Arc::new(armed))
                        };
                        #[cfg(not(feature = "test-hooks"))]
                        let replicas = m.replicas;
                        let workers = embed::workers::Workers::new(replicas, metrics.clone());
                        let (b, h) = Batcher::spawn(profile_rx, workers, space, metrics);
                        let _ = state.engine.set(Engine {
                            model: m.name,
                            devices,
                            family: Family::Embed(EmbedEngine {
                                tokenizer: m.tokenizer,
                                service: EmbedService::new(b.clone(), admission),
                                max_positions: m.max_positions,
                                dim: m.dim,
                            }),
                        });
                        *slot.lock().unwrap() = Some(Running::Embed(b, h));
                        tracing::info!(
                            took_ms = started.elapsed().as_millis() as u64,
                            "model loaded; ready"
                        );
                    }
                    Ok(Ok(Loaded::Generate(m))) => {
                        let devices = m.replicas.iter().map(|(l, _)| l.clone()).collect();
                        let started_service = GenerateService::start(GenerateOptions {
                            replicas: m.replicas,
                            tokenizer: m.tokenizer.clone(),
                            eos: m.eos,
                            profile: profile_rx,
                            metrics: Arc::new(metrics.generation()),
                            admission,
                            space,
                            profiler,
                            overlap,
                            #[cfg(feature = "test-hooks")]
                            faults: Arc::new(hooks::Armed::arm(&test_hooks.faults, |w| {
                                m.tokenizer.encode(w).unwrap_or_default()
                            })),
                        });
                        match started_service {
                            Ok(service) => {
                                let service = Arc::new(service);
                                let _ = state.engine.set(Engine {
                                    model: m.name,
                                    devices,
                                    family: Family::Generate(GenEngine {
                                        tokenizer: m.tokenizer,
                                        chat: m.chat,
                                        service: service.clone(),
                                        max_positions: m.max_positions,
                                    }),
                                });
                                *slot.lock().unwrap() = Some(Running::Generate(service));
                                tracing::info!(
                                    took_ms = started.elapsed().as_millis() as u64,
                                    kv_bytes_per_token = m.kv_bytes_per_token,
                                    "generation model loaded; ready"
                                );
                            }
                            Err(e) => {
                                *load_error.lock().unwrap() = Some(RuntimeError::Serve(format!(
                                    "cannot start an engine thread: {e}"
                                )));
                                let _ = shutdown.send(true);
                            }
                        }
                    }
                    Ok(Err(e)) => {
                        tracing::error!("model load failed: {e}");
                        *load_error.lock().unwrap() = Some(e);
                        let _ = shutdown.send(true);
                    }
                    Err(e) => {
                        *load_error.lock().unwrap() =
                            Some(RuntimeError::Serve(format!("model loader panicked: {e}")));
                        let _ = shutdown.send(true);
                    }
                }
            });
        }

        let drain_timeout = opts.profile.drain_timeout;
        let app = api::router(state.clone());
        let limits = opts.limits;
        let task = tokio::spawn(async move {
            // The listener stays open while the engine drains, so a request that arrives then
            // is answered 503 "shutting down" (a load balancer retries it elsewhere) instead of
            // meeting a refused connection.
            let (close_tx, close_rx) = watch::channel(false);
            let mut serve = tokio::spawn(http::serve(listener, app, limits, close_rx));
            tokio::select! {
                r = &mut serve => {
                    return r.map_err(|e| RuntimeError::Serve(e.to_string()));
                }
                _ = shutdown_rx.wait_for(|v| *v) => {}
            }
            state.draining.store(true, Ordering::Release);
            let deadline = tokio::time::Instant::now() + drain_timeout;
            let r = running.lock().unwrap().take();
            let drained = match r {
                Some(Running::Embed(b, h)) => {
                    b.shutdown();
                    drain_or_abort(h, deadline, || b.abort()).await
                }
                Some(Running::Generate(g)) => {
                    g.shutdown();
                    let g2 = g.clone();
                    let join = tokio::task::spawn_blocking(move || g2.join());
                    drain_or_abort(join, deadline, || g.abort()).await
                }
                None => true,
            };
            if drained {
                tracing::info!("drained: every accepted request was answered");
            } else {
                tracing::warn!(
                    "drain_timeout ({}) passed: requests still queued or generating were answered 503",
                    profiles::format_duration(drain_timeout)
                );
            }
            // Every accepted request has its answer; let the connections write them, then close.
            let _ = close_tx.send(true);
            if tokio::time::timeout(ABORT_GRACE, &mut serve).await.is_err() {
                tracing::warn!("connections still open after the drain; closing them");
                serve.abort();
            }
            if let Some(e) = load_error.lock().unwrap().take() {
                return Err(e);
            }
            Ok(())
        });
        Ok(Server {
            addr,
            shutdown,
            task,
        })
    }

    /// Starts a graceful shutdown. Model routes answer 503 from now on (the listener stays open
    /// meanwhile); everything accepted is computed until `drain_timeout`; what is still queued
    /// or generating then gets 503 (a stream gets an error event), never a silent close; the
    /// connections then finish writing and the server stops, within `drain_timeout` + 4 s.
    pub fn shutdown(&self) {
        let _ = self.shutdown.send(true);
    }

    /// A handle that can start the shutdown from another task (a signal handler).
    pub fn stopper(&self) -> Stopper {
        Stopper(self.shutdown.clone())
    }

    /// Waits until the server has stopped.
    pub async fn wait(self) -> Result<(), RuntimeError> {
        self.task
            .await
            .map_err(|e| RuntimeError::Serve(e.to_string()))?
    }
}

/// Starts a server's graceful shutdown from anywhere.
#[derive(Clone)]
pub struct Stopper(watch::Sender<bool>);

impl Stopper {
    /// Same as [`Server::shutdown`].
    pub fn stop(&self) {
        let _ = self.0.send(true);
    }
}
