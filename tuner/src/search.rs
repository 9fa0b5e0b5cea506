//! The live search: measures strategy points against the server, journals each trial, re-measures
//! the winner and writes the tuned profile with its provenance.

use crate::journal::{Header, Journal, Trial};
use crate::server::adapter::Adapter;
use crate::server::external::External;
use crate::server::{Server, Target as Runtime};
use crate::space::{key, Knobs, Space};
use crate::strategy::{self, Evaluator, Strategy};
use crate::trial::{
    cannot_win, effective_targets, next_rate, result_of, settle, start_from_estimate,
    ProbeSettings, RateResult, RateSearch,
};
use indicatif::{ProgressBar, ProgressStyle};
use loadgen::slo::{format_secs, Target};
use loadgen::workload::Workload;
use profiles::Profile;
use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use results::host::{git_revision, host_cpu, host_gpu};

/// Where the server comes from.
#[derive(Debug, Clone)]
pub enum ServerSpec {
    /// Start this command (e.g. `runtime serve --profile p.toml`) as a child on a free port.
    Spawn(Vec<String>),
    /// A server that is already running.
    Url(String),
    /// A server started from an adapter file (restarted per trial that changes its knobs).
    External(Box<Adapter>),
}

/// Everything `tuner search` needs.
#[derive(Clone)]
pub struct SearchOptions {
    /// Targets as written.
    pub targets: Vec<String>,
    /// Knobs and ranges.
    pub space: Space,
    /// Most trials.
    pub budget: usize,
    /// Wall-clock budget for trials (the confirmation race comes on top).
    pub time: Duration,
    /// Strategy.
    pub strategy: Strategy,
    /// Strategy seed.
    pub seed: u64,
    /// How probes run.
    pub probe: ProbeSettings,
    /// Workload spec (for the journal and provenance).
    pub workload_spec: String,
    /// Workload bodies.
    pub workload: Workload,
    /// Server under test.
    pub server: ServerSpec,
    /// The space came from `--space` (not a default the server type may replace).
    pub space_given: bool,
    /// Tuned profile output.
    pub out: PathBuf,
    /// Folder of search journals.
    pub journal_dir: PathBuf,
    /// Resume this search id.
    pub resume: Option<String>,
    /// `rate_limit` = this × sustainable rate.
    pub rate_limit_fraction: f64,
    /// Leaders (trials within the bisection tolerance of the best) raced to confirm the winner.
    pub leaders: usize,
    /// No progress bars.
    pub quiet: bool,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Measure only the grid points whose index is k mod n (grid strategy; see [`Header::shard`]).
    pub shard: Option<(usize, usize)>,
}

/// Errors that end a search.
#[derive(Debug, thiserror::Error)]
pub enum SearchError {
    /// Bad options.
    #[error("{0}")]
    Config(String),
    /// Server control failed.
    #[error(transparent)]
    Control(#[from] crate::server::ControlError),
    /// Journal I/O failed.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    /// The search was interrupted; the journal holds every finished trial.
    #[error("interrupted after {trials} finished trials; continue with `tuner search --resume {search_id}`")]
    Interrupted {
        /// Search id to resume.
        search_id: String,
        /// Trials in the journal.
        trials: usize,
    },
    /// No configuration met the targets.
    #[error("no configuration met the targets in {trials} trials (search {search_id}); loosen the targets or widen the space")]
    NothingFeasible {
        /// Search id.
        search_id: String,
        /// Trials run.
        trials: usize,
    },
}

/// What a finished search produced.
#[derive(Debug, Clone)]
pub struct SearchOutcome {
    /// Search id.
    pub search_id: String,
    /// The tuned profile as written (None for a grid shard, which writes none).
    pub profile: Option<Profile>,
    /// Where it was written.
    pub out: PathBuf,
    /// Every file written (profile; or `.env`, `.flags`, `.client.env` and provenance `.toml`).
    pub written: Vec<PathBuf>,
    /// Every trial.
    pub trials: Vec<Trial>,
    /// The winner's knobs.
    pub best: Knobs,
    /// The confirmed sustainable rate (written to the profile).
    pub best_rps: f64,
}

struct Live<'a> {
    rt: &'a tokio::runtime::Runtime,
    server: &'a mut Server,
    journal: &'a mut Journal,
    cache: HashMap<String, Trial>,
    order: Vec<Trial>,
    targets: Vec<Target>,
    settings: ProbeSettings,
    workload: &'a Workload,
    headers: Vec<(String, String)>,
    budget: usize,
    deadline: Instant,
    cancel: Arc<AtomicBool>,
    interrupted: bool,
    measured_times: Vec<f64>,
    quiet: bool,
    seed: u64,
    error: Option<SearchError>,
}

impl Live<'_> {
    fn best(&self) -> Option<&Trial> {
        crate::confirm::winner(&self.order)
    }

    fn measure(&mut self, knobs: &Knobs) -> Result<RateResult, SearchError> {
        let best = self
            .best()
            .map(|t| t.result.sustainable_rps)
            .filter(|r| *r > 0.0);
        let bar = (!self.quiet && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new_spinner();
            b.set_style(
                ProgressStyle::with_template("{spinner} trial {prefix}: {msg} [{elapsed}]")
                    .expect("static template"),
            );
            b.set_prefix(format!("{}/{}", self.order.len() + 1, self.budget));
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        let (rt, server) = (self.rt, &mut *self.server);
        match rt.block_on(server.apply(knobs)) {
            Ok(()) => {}
            Err(crate::server::ControlError::Rejected(why)) => {
                if let Some(b) = bar {
                    b.finish_and_clear();
                }
                if !self.quiet {
                    eprintln!("the server refused these knobs (counted as 0 req/s): {why}");
                }
                return Ok(RateResult {
                    sustainable_rps: 0.0,
                    failed_rps: None,
                    probes: Vec::new(),
                    rejected: Some(why),
                });
            }
            Err(e) => return Err(e.into()),
        }
        rt.block_on(server.wait_idle(Duration::from_secs(60)));
        let search = RateSearch {
            url: server.url(),
            workload: self.workload,
            targets: &self.targets,
            settings: &self.settings,
            cancel: self.cancel.clone(),
            headers: self.headers.clone(),
            max_in_flight: server.client_concurrency(knobs),
        };
        // The first trial starts from half a short closed-loop saturation run: bracketing up
        // from a fixed guess costs a probe per doubling (16 → 10,000 req/s on a GPU is most of
        // a trial's probes), the order of magnitude costs one 2 s run.
        let hint = match best {
            Some(b) => b,
            None => {
                if let Some(b) = &bar {
                    b.set_message(format!(
                        "estimating the order of magnitude (closed loop, {:.0} s)",
                        self.settings.saturation_secs
                    ));
                }
                let fill = if self.settings.saturation_fill {
                    rt.block_on(server.running_capacity())
                } else {
                    None
                };
                let est = rt.block_on(search.saturation(fill));
                rt.block_on(server.wait_idle(Duration::from_secs(60)));
                est.filter(|x| x.is_finite() && *x > 0.0)
                    .map(start_from_estimate)
                    .unwrap_or(16.0)
            }
        };
        let mut probes = Vec::new();
        while let Some(rate) = next_rate(&probes, hint, &self.settings) {
            if best.is_some_and(|b| cannot_win(&probes, b, &self.settings)) {
                break;
            }
            if let Some(b) = &bar {
                b.set_message(format!("probing {rate:.1}/s"));
            }
            self.seed += 1;
            let (probe, _) = rt
                .block_on(search.probe(rate, self.seed, settle(&probes)))
                .map_err(|e| SearchError::Config(e.to_string()))?;
            rt.block_on(server.wait_idle(Duration::from_secs(60)));
            if self.cancel.load(Ordering::Relaxed) {
                return Err(SearchError::Config("cancelled".into()));
            }
            probes.push(probe);
        }
        if let Some(b) = bar {
            b.finish_and_clear();
        }
        Ok(result_of(probes))
    }
}

impl Evaluator for Live<'_> {
    fn eval(&mut self, knobs: &Knobs) -> Option<f64> {
        let k = key(knobs);
        if let Some(t) = self.cache.get(&k) {
            return Some(t.result.sustainable_rps);
        }
        if self.error.is_some()
            || self.order.len() >= self.budget
            || self.cancel.load(Ordering::Relaxed)
        {
            return None;
        }
        // Start a trial only if a typical one still fits in the time budget.
        let typical = self.measured_times.iter().cloned().fold(0.0, f64::max);
        if Instant::now() + Duration::from_secs_f64(typical) > self.deadline {
            return None;
        }
        let t0 = Instant::now();
        let result = match self.measure(knobs) {
            Ok(r) => r,
            Err(e) => {
                if self.cancel.load(Ordering::Relaxed) {
                    self.interrupted = true;
                } else {
                    self.error = Some(e);
                }
                return None;
            }
        };
        let elapsed = t0.elapsed().as_secs_f64();
        self.measured_times.push(elapsed);
        let trial = Trial {
            index: self.order.len(),
            key: k.clone(),
            knobs: knobs.clone(),
            result,
            elapsed_s: elapsed,
        };
        if let Err(e) = self.journal.append(&trial) {
            self.error = Some(e.into());
            return None;
        }
        let rate = trial.result.sustainable_rps;
        self.cache.insert(k, trial.clone());
        self.order.push(trial);
        let best = self.best().map(|t| t.result.sustainable_rps).unwrap_or(0.0);
        if !self.quiet {
            let knobs_s = knobs
                .iter()
                .map(|(n, v)| format!("{n}={v}"))
                .collect::<Vec<_>>()
                .join(" ");
            eprintln!(
                "trial {:>2}/{}  {knobs_s}  → {rate:.1} req/s  (best {best:.1}, {elapsed:.0}s)",
                self.order.len(),
                self.budget
            );
        }
        Some(rate)
    }
}

/// A new search id: UTC time plus a random suffix.
pub fn new_search_id() -> String {
    let (d, t) = utc_now();
    format!(
        "{}-{}-{:04x}",
        d.replace('-', ""),
        t.replace(':', ""),
        rand::random::<u16>()
    )
}

/// (`YYYY-MM-DD`, `HH:MM:SS`) in UTC, without a date crate.
pub fn utc_now() -> (String, String) {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    (
        format!("{year:04}-{month:02}-{day:02}"),
        format!("{:02}:{:02}:{:02}", rem / 3600, rem / 60 % 60, rem % 60),
    )
}

/// The time a search has left: its journal's `--time` less what its finished trials took (a
/// resumed search keeps its original budget), or `time` for a new search or an old journal.
fn time_left(header: &Header, done: &[Trial], time: Duration) -> Duration {
    let spent: f64 = done.iter().map(|r| r.elapsed_s).sum();
    left_of(header.time_s, spent, time)
}

/// `budget_s − spent_s` (never below 0), or `time` when there is no recorded budget.
fn left_of(budget_s: Option<f64>, spent_s: f64, time: Duration) -> Duration {
    budget_s.map_or(time, |t| Duration::from_secs_f64((t - spent_s).max(0.0)))
}

/// Runs a search to the end (or to an interruption, leaving the journal consistent).
pub fn search(opts: SearchOptions, cancel: Arc<AtomicBool>) -> Result<SearchOutcome, SearchError> {
    let started = Instant::now();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .map_err(|e| SearchError::Config(e.to_string()))?;
    let search_id = opts.resume.clone().unwrap_or_else(new_search_id);
    // The server first: a search that cannot reach it leaves no empty journal behind.
    let mut server = match &opts.server {
        ServerSpec::Spawn(cmd) => {
            Server::Runtime(Box::new(rt.block_on(Runtime::spawn(cmd.clone()))?))
        }
        ServerSpec::Url(u) => Server::Runtime(Box::new(rt.block_on(Runtime::url(u))?)),
        ServerSpec::External(a) => {
            let logs = opts.journal_dir.join(&search_id).join("logs");
            let mut e = External::new((**a).clone(), logs);
            // Started once with its defaults (mid-range where it has none), so an adapter that
            // cannot start fails here, with its log, before any trial.
            let first: Knobs = opts
                .space
                .decode(&opts.space.encode(&a.defaults()))
                .into_iter()
                .filter(|(k, _)| !a.is_client(k))
                .collect();
            eprintln!("starting {} …", a.name);
            rt.block_on(e.apply(&first))?;
            Server::External(Box::new(e))
        }
    };
    // A foreign server at a URL cannot be reconfigured: its client side is what can be tuned.
    let mut space = opts.space.clone();
    if matches!(&server, Server::Runtime(t) if !t.is_batchtune) {
        let server_knobs: Vec<&String> = space
            .knobs
            .keys()
            .filter(|k| !server.is_client_knob(k))
            .collect();
        if !server_knobs.is_empty() {
            if opts.space_given {
                return Err(SearchError::Config(format!(
                    "{} is not batchtune's runtime, so its knobs ({}) cannot be set from here: \
                     search only {} at a --url, or describe the server in an adapter file and \
                     use --server",
                    server.url(),
                    server_knobs
                        .iter()
                        .map(|k| k.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    crate::server::CLIENT_CONCURRENCY
                )));
            }
            eprintln!(
                "{} is not batchtune's runtime: tuning the client side ({}, and the rate)",
                server.url(),
                crate::server::CLIENT_CONCURRENCY
            );
            space = Space::client_space();
        }
    }
    let (mut journal, header, done) = match &opts.resume {
        Some(id) => {
            let (j, h, t) = Journal::resume(&opts.journal_dir, id)?;
            eprintln!(
                "resuming search {id}: {} finished trials will not be repeated",
                t.len()
            );
            (j, h, t)
        }
        None => {
            let h = Header {
                search_id: search_id.clone(),
                targets: opts.targets.clone(),
                space: space.clone(),
                strategy: opts.strategy.name().to_string(),
                budget: opts.budget,
                seed: opts.seed,
                probe: opts.probe.clone(),
                workload: opts.workload_spec.clone(),
                shard: opts.shard.map(|(k, n)| [k, n]),
                time_s: Some(opts.time.as_secs_f64()),
                started_unix_s: SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs_f64())
                    .unwrap_or(0.0),
                server: match &opts.server {
                    ServerSpec::External(a) => Some(a.name.clone()),
                    _ => None,
                },
            };
            let j = Journal::create(&opts.journal_dir, &h)?;
            (j, h, Vec::new())
        }
    };
    let targets: Vec<Target> = header
        .targets
        .iter()
        .map(|t| Target::parse(t).map_err(|e| SearchError::Config(format!("target: {e}"))))
        .collect::<Result<_, _>>()?;
    let effective = effective_targets(&targets);
    // On resume the journal decides; a strategy it names that we cannot read is an error, not a
    // silent switch to another strategy.
    let strategy_kind = if opts.resume.is_some() {
        Strategy::parse(&header.strategy)
            .map_err(|e| SearchError::Config(format!("journal: {e}")))?
    } else {
        opts.strategy
    };
    // Probes must measure capacity, not a rate limit left on by a previous profile.
    let base: Profile = match &server {
        Server::Runtime(t) if t.is_batchtune => {
            rt.block_on(t.put_config(serde_json::json!({"rate_limit": 0.0})))?;
            serde_json::from_value(rt.block_on(t.get("/config"))?)
                .map_err(|e| SearchError::Config(format!("GET /config: {e}")))?
        }
        _ => Profile::default(),
    };
    let start_knobs = match &server {
        Server::External(e) => e.adapter.defaults(),
        Server::Runtime(_) => header.space.from_profile(&base),
    };
    let time = time_left(&header, &done, opts.time);
    eprintln!(
        "search {}: targets {} | strategy {:?} | budget {} trials / {} | server {}",
        header.search_id,
        effective
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        strategy_kind,
        header.budget,
        format_secs(time.as_secs_f64()),
        server.url()
    );
    let mut live = Live {
        rt: &rt,
        server: &mut server,
        journal: &mut journal,
        cache: done.iter().map(|t| (t.key.clone(), t.clone())).collect(),
        order: done.clone(),
        targets: effective.clone(),
        settings: header.probe.clone(),
        workload: &opts.workload,
        headers: opts.headers.clone(),
        budget: header.budget,
        deadline: started + time,
        cancel: cancel.clone(),
        interrupted: false,
        measured_times: done.iter().map(|t| t.elapsed_s).collect(),
        quiet: opts.quiet,
        seed: header.seed * 1000 + done.len() as u64 * 17,
        error: None,
    };
    strategy::run_shard(
        strategy_kind,
        &header.space,
        &start_knobs,
        header.budget,
        header.seed,
        header.shard.map(|[k, n]| (k, n)),
        &mut live,
    );
    if let Some(e) = live.error.take() {
        return Err(e);
    }
    let trials = live.order.clone();
    if live.interrupted || cancel.load(Ordering::Relaxed) {
        return Err(SearchError::Interrupted {
            search_id: header.search_id.clone(),
            trials: trials.len(),
        });
    }
    let Some(best) = live
        .best()
        .cloned()
        .filter(|t| t.result.sustainable_rps > 0.0)
    else {
        return Err(SearchError::NothingFeasible {
            search_id: header.search_id.clone(),
            trials: trials.len(),
        });
    };
    drop(live);
    if let Some([k, n]) = header.shard {
        // A shard is part of a grid benchmark: its best is not a winner worth a profile.
        eprintln!(
            "search {}: shard {k}/{n} of the grid done ({} trials); merge the shards with \
             `tuner replay ID1,ID2,…` (no profile written)",
            header.search_id,
            trials.len()
        );
        return Ok(SearchOutcome {
            search_id: header.search_id.clone(),
            profile: None,
            out: opts.journal_dir.join(&header.search_id),
            written: vec![],
            best: best.knobs.clone(),
            best_rps: best.result.sustainable_rps,
            trials,
        });
    }

    // The leaders raced, the winner's rate measured with an interval (confirm.rs says why).
    let settings = crate::confirm::RaceSettings {
        leaders: opts.leaders.max(1),
        repeats: header.probe.repeats.max(1),
        probe_secs: header.probe.duration.as_secs_f64(),
        tolerance: header.probe.tolerance,
        // Down a quarter of a doubling (19%), up one bisection tolerance (9% at the default
        // 10%): relative, so the lattice's resolution does not change how far the race goes.
        max_down: crate::trial::LATTICE as i64 / 4,
        max_up: crate::trial::tolerance_steps(header.probe.tolerance),
    };
    let mut race = crate::confirm::Race::new(&trials, settings).ok_or_else(|| {
        SearchError::NothingFeasible {
            search_id: header.search_id.clone(),
            trials: trials.len(),
        }
    })?;
    eprintln!(
        "confirming: {} raced at {:.1} req/s (probes repeated while a verdict is uncertain)",
        race.leaders()
            .iter()
            .map(|&i| format!("trial {}", trials[i].index + 1))
            .collect::<Vec<_>>()
            .join(", "),
        best.result.sustainable_rps
    );
    let mut applied: Option<usize> = None;
    let mut seed = 9_000u64;
    while let Some((i, rate)) = race.next_probe() {
        let t = &trials[i];
        if applied != Some(i) {
            rt.block_on(server.apply(&t.knobs))?;
            rt.block_on(server.wait_idle(Duration::from_secs(60)));
            applied = Some(i);
        }
        let rs = RateSearch {
            url: server.url(),
            workload: &opts.workload,
            targets: &effective,
            settings: &header.probe,
            cancel: cancel.clone(),
            headers: opts.headers.clone(),
            max_in_flight: server.client_concurrency(&t.knobs),
        };
        // The trial's own probes say how long its latencies are: warm up at least that long.
        seed += 1;
        let (p, _) = rt
            .block_on(rs.probe(rate, seed, settle(&t.result.probes)))
            .map_err(|e| SearchError::Config(e.to_string()))?;
        rt.block_on(server.wait_idle(Duration::from_secs(60)));
        if cancel.load(Ordering::Relaxed) {
            return Err(SearchError::Interrupted {
                search_id: header.search_id.clone(),
                trials: trials.len(),
            });
        }
        eprintln!(
            "  trial {} at {rate:.1} req/s: {} (p95 {}, drift {})",
            t.index + 1,
            if p.pass { "met the targets" } else { "missed" },
            loadgen::slo::format_secs(p.p95),
            p.drift
                .map(|d| format!("{:+.0} ms/s", d[0] * 1e3))
                .unwrap_or_else(|| "n/a".into())
        );
        race.record(i, p);
    }
    let confirmation = race.outcome();
    let best = trials[confirmation.trial].clone();
    // The winner's own knobs on the server when the files are written (the race may have
    // ended on another leader).
    if applied != Some(confirmation.trial) {
        rt.block_on(server.apply(&best.knobs))?;
    }
    eprintln!(
        "  {}: {:.1} req/s, interval {:.1}–{} req/s",
        if confirmation.confirmed {
            format!("confirmed trial {}", best.index + 1)
        } else {
            format!("NOT confirmed (trial {})", best.index + 1)
        },
        confirmation.rate,
        confirmation.rate,
        confirmation
            .failed_above
            .map(|f| format!("{f:.1}"))
            .unwrap_or_else(|| "∞".into())
    );
    let again = confirmation.probes.clone();
    let mut profile = tuned_profile(
        &opts,
        &confirmation,
        &header,
        &base,
        &best,
        &again,
        &trials,
        started.elapsed(),
        server.url(),
    );
    server.stop();
    let say = |what: &str| {
        format!(
            "# Tuned by `tuner search` ({}){what}: {} trials, targets {}.\n# Provenance in the .toml beside it; regenerate rather than edit by hand.",
            header.search_id,
            trials.len(),
            header.targets.join(" "),
        )
    };
    let write = |path: &std::path::Path, text: &str| -> Result<PathBuf, SearchError> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .map_err(|e| SearchError::Config(format!("{}: {e}", dir.display())))?;
        }
        std::fs::write(path, text)
            .map_err(|e| SearchError::Config(format!("{}: {e}", path.display())))?;
        let copy = opts
            .journal_dir
            .join(&header.search_id)
            .join(path.file_name().unwrap_or_default());
        let _ = std::fs::write(copy, text);
        Ok(path.to_path_buf())
    };
    // The client's rate keeps the same headroom below the sustainable rate as a rate limit.
    let client_rate = confirmation.rate * opts.rate_limit_fraction;
    let written = match &server {
        Server::Runtime(t) if t.is_batchtune => {
            profile
                .validate()
                .map_err(|e| SearchError::Config(format!("tuned profile is invalid: {e}")))?;
            let text = format!(
                "# Tuned by `tuner search` ({}): {} trials, targets {}.\n# Provenance below; regenerate rather than edit by hand.\n{}",
                header.search_id,
                trials.len(),
                header.targets.join(" "),
                profile.to_toml_string()
            );
            let mut w = vec![write(&opts.out, &text)?];
            if let Some(c) = server.client_concurrency(&best.knobs) {
                let text = format!(
                    "{}\n{}",
                    say(" for the client"),
                    client_lines(Some(c), client_rate)
                );
                w.push(write(&opts.out.with_extension("client.env"), &text)?);
            }
            w
        }
        Server::Runtime(_) => {
            // A server the tuner cannot configure: only the client's settings are tuned.
            let text = format!(
                "{}\n{}",
                say(" for the client"),
                client_lines(server.client_concurrency(&best.knobs), client_rate)
            );
            let mut w = vec![write(&opts.out.with_extension("client.env"), &text)?];
            w.push(write(
                &opts.out.with_extension("toml"),
                &provenance_file(&say(""), &best.knobs, &mut profile),
            )?);
            w
        }
        Server::External(e) => {
            let a = &e.adapter;
            let (env, flags) = a.server_files(&best.knobs, &say(&format!(" for {}", a.name)));
            let mut w = vec![write(&opts.out.with_extension("env"), &env)?];
            if let Some(f) = flags {
                w.push(write(&opts.out.with_extension("flags"), &format!("{f}\n"))?);
            }
            if let Some(c) = a.client_file(&best.knobs, client_rate, &say(" for the client")) {
                w.push(write(&opts.out.with_extension("client.env"), &c)?);
            }
            w.push(write(
                &opts.out.with_extension("toml"),
                &provenance_file(&say(&format!(" for {}", a.name)), &best.knobs, &mut profile),
            )?);
            w
        }
    };
    Ok(SearchOutcome {
        search_id: header.search_id,
        profile: matches!(&server, Server::Runtime(t) if t.is_batchtune).then_some(profile),
        out: opts.out.clone(),
        written,
        trials,
        best_rps: confirmation.rate,
        best: best.knobs,
    })
}

/// A pipeline's client settings under seed 001's names: its concurrent requests (when searched)
/// and its rate per minute.
fn client_lines(concurrency: Option<usize>, rate_rps: f64) -> String {
    let mut s = String::new();
    if let Some(c) = concurrency {
        s.push_str(&format!("MAX_CONCURRENT_REQUESTS={c}\n"));
    }
    s.push_str(&format!(
        "REQUESTS_PER_MINUTE={}\n",
        (rate_rps * 60.0).floor()
    ));
    s
}

/// The tuned knobs and the search's provenance for a server that is not batchtune's runtime
/// (the runtime-only fields of `profile`'s provenance are left out).
fn provenance_file(header: &str, knobs: &Knobs, profile: &mut Profile) -> String {
    let mut prov = profile.provenance.take().unwrap_or_default();
    for k in ["model", "devices", "dtype"] {
        prov.remove(k);
    }
    let knobs: toml::Table = knobs
        .iter()
        .map(|(k, v)| {
            let t = match v {
                crate::space::Value::Int(i) => toml::Value::Integer(*i),
                crate::space::Value::Float(x) => toml::Value::Float(*x),
                crate::space::Value::Text(s) => toml::Value::String(s.clone()),
            };
            (k.clone(), t)
        })
        .collect();
    let mut doc = toml::Table::new();
    doc.insert("knobs".into(), toml::Value::Table(knobs));
    doc.insert(
        "provenance".into(),
        toml::Value::Table(prov.into_iter().collect()),
    );
    format!("{header}\n{}", toml::to_string(&doc).unwrap_or_default())
}

#[allow(clippy::too_many_arguments)]
fn tuned_profile(
    opts: &SearchOptions,
    conf: &crate::confirm::Outcome,
    header: &Header,
    base: &Profile,
    best: &Trial,
    again: &[crate::trial::Probe],
    trials: &[Trial],
    elapsed: Duration,
    url: &str,
) -> Profile {
    use toml::Value as T;
    let mut p = base.clone();
    for (k, v) in &best.knobs {
        // Values come from the validated space, so they parse.
        let _ = p.set_knob(k, &v.to_string());
    }
    let rate = conf.rate;
    p.rate_limit = ((rate * opts.rate_limit_fraction) * 10.0).round() / 10.0;
    p.rate_burst = 0;
    let med = |f: fn(&crate::trial::Probe) -> f64| -> f64 {
        let mut v: Vec<f64> = again.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v.get(v.len() / 2).copied().unwrap_or(0.0)
    };
    let spread = |f: fn(&crate::trial::Probe) -> f64| -> T {
        let v: Vec<f64> = again.iter().map(f).collect();
        let lo = v.iter().cloned().fold(f64::INFINITY, f64::min);
        let hi = v.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        T::Array(vec![T::Float(round4(lo)), T::Float(round4(hi))])
    };
    let (date, time) = utc_now();
    let mut prov = std::collections::BTreeMap::new();
    let mut put = |k: &str, v: T| {
        prov.insert(k.to_string(), v);
    };
    put("search_id", T::String(header.search_id.clone()));
    put(
        "targets",
        T::Array(header.targets.iter().cloned().map(T::String).collect()),
    );
    put("sustainable_rps", T::Float(round4(rate)));
    put("sustainable_rps_confirmed", T::Boolean(conf.confirmed));
    // [highest lattice rate whose pooled verdict passed, lowest above it whose verdict failed].
    put(
        "sustainable_rps_interval",
        T::Array(vec![
            T::Float(round4(rate)),
            conf.failed_above
                .map(|f| T::Float(round4(f)))
                .unwrap_or(T::String("not reached".into())),
        ]),
    );
    put("winner_trial", T::Integer(best.index as i64 + 1));
    put(
        "search_best_rps",
        T::Float(round4(
            trials
                .iter()
                .map(|t| t.result.sustainable_rps)
                .fold(0.0, f64::max),
        )),
    );
    // Every verdict of the race: trial (1-based), rate, probes, probes passed, verdict.
    put(
        "confirmation_steps",
        T::Array(
            conf.steps
                .iter()
                .map(|st| {
                    let mut t = toml::Table::new();
                    t.insert(
                        "trial".into(),
                        T::Integer(trials[st.trial].index as i64 + 1),
                    );
                    t.insert("rate_rps".into(), T::Float(round4(st.rate)));
                    t.insert("probes".into(), T::Integer(st.probes as i64));
                    t.insert("passed".into(), T::Integer(st.passed as i64));
                    t.insert("verdict".into(), T::String(st.verdict.name().into()));
                    T::Table(t)
                })
                .collect(),
        ),
    );
    put(
        "search_bracket_rps",
        T::Array(vec![
            T::Float(round4(best.result.sustainable_rps)),
            best.result
                .failed_rps
                .map(|f| T::Float(round4(f)))
                .unwrap_or(T::String("not reached".into())),
        ]),
    );
    put("rate_limit_fraction", T::Float(opts.rate_limit_fraction));
    if let Some(crate::space::Value::Int(c)) = best.knobs.get(crate::server::CLIENT_CONCURRENCY) {
        put("client_concurrency", T::Integer(*c));
    }
    put("remeasured_runs", T::Integer(again.len() as i64));
    put(
        "remeasured_passed",
        T::Integer(again.iter().filter(|p| p.pass).count() as i64),
    );
    put("remeasured_achieved_rps_range", spread(|p| p.achieved_rps));
    put("p50_s", T::Float(round4(med(|p| p.p50))));
    put("p95_s", T::Float(round4(med(|p| p.p95))));
    put("p99_s", T::Float(round4(med(|p| p.p99))));
    put("p95_s_range", spread(|p| p.p95));
    // Generation: the same re-measurements in token terms (medians over the runs that streamed).
    let tok: Vec<crate::trial::TokenFigures> = again.iter().filter_map(|p| p.tokens).collect();
    if !tok.is_empty() {
        let m = |f: fn(&crate::trial::TokenFigures) -> f64| {
            let mut v: Vec<f64> = tok.iter().map(f).collect();
            v.sort_by(f64::total_cmp);
            T::Float(round4(v[v.len() / 2]))
        };
        put("ttft_p50_s", m(|t| t.ttft_p50));
        put("ttft_p95_s", m(|t| t.ttft_p95));
        put("tpot_p50_s", m(|t| t.tpot_p50));
        put("tpot_p95_s", m(|t| t.tpot_p95));
        put("e2e_p95_s", T::Float(round4(med(|p| p.p95))));
        put("output_tokens_per_s", m(|t| t.output_tokens_per_s));
        if tok.iter().all(|t| t.goodput_rps.is_some()) {
            put("goodput_rps", m(|t| t.goodput_rps.unwrap_or(0.0)));
        }
    }
    put("workload", T::String(header.workload.clone()));
    put("model", T::String(base.model.clone()));
    put(
        "devices",
        T::Array(base.devices.iter().cloned().map(T::String).collect()),
    );
    put("dtype", T::String(base.dtype.to_string()));
    put("host_cpu", T::String(host_cpu()));
    put("host_gpu", T::String(host_gpu()));
    put("date_utc", T::String(format!("{date}T{time}Z")));
    put("git_revision", T::String(git_revision()));
    put("strategy", T::String(header.strategy.clone()));
    put("trials", T::Integer(trials.len() as i64));
    put("budget", T::Integer(header.budget as i64));
    put("search_seconds", T::Float(elapsed.as_secs_f64().round()));
    put(
        "probe_seconds",
        T::Float(header.probe.duration.as_secs_f64()),
    );
    put("server_url", T::String(url.to_string()));
    p.provenance = Some(prov);
    p
}

fn round4(x: f64) -> f64 {
    if x.is_finite() {
        (x * 1e4).round() / 1e4
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_resumed_search_keeps_what_its_trials_left_of_its_time() {
        let asked = Duration::from_secs(60);
        // An old journal (no time recorded): the time asked now.
        assert_eq!(left_of(None, 500.0, asked), asked);
        assert_eq!(left_of(Some(600.0), 0.0, asked), Duration::from_secs(600));
        assert_eq!(left_of(Some(600.0), 500.0, asked), Duration::from_secs(100));
        assert_eq!(left_of(Some(600.0), 700.0, asked), Duration::ZERO);
    }
}
