//! What every actor and connection shares: the config in force, counters, the process table, cgroups, the uid pool, command slots, rate limiter, draining flag — and no actor (actors are found through the actor tree's handle, `actors::tree::ActorTree`).

use std::collections::VecDeque;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::time::Instant;

use tokio::sync::Semaphore;

use crate::actors::command_record::CommandRecord;
use crate::budget::{Budget, Charge, Outboxes};
use crate::cgroup::Cgroups;
use crate::config::Config;
use crate::process::ProcessTable;
use crate::process::background::BackgroundLimits;
use crate::process::shell::EnvMap;
use crate::process::spawn::Credentials;
use crate::process::table::SessionKey;
use crate::stats::Stats;

/// Shared, read-mostly state of one daemon.
#[derive(Debug)]
pub struct Context {
    /// The configuration the daemon started with: read the keys that are
    /// never reloaded here (socket, identities, isolation, pools). What a
    /// SIGHUP may change is read through [`Context::live`].
    pub config: Config,
    /// The configuration in force now (after the last SIGHUP); its
    /// restart-only keys always equal `config`'s. A session takes a snapshot
    /// when it is created and keeps it for its life.
    live: RwLock<Arc<Config>>,
    /// The shell commands run under (the configured one, or /bin/sh when it is absent).
    pub shell: PathBuf,
    /// Where sessions start when they name no cwd.
    pub default_cwd: PathBuf,
    /// `[commands.env]` plus HOME, USER and SHELL of the command user.
    pub base_env: EnvMap,
    /// The identity commands switch to (`run_as_user`), or `None` for the
    /// daemon's own; under uid-per-session each session's lease takes its place.
    pub credentials: Option<Credentials>,
    /// Counters behind `system.stats`.
    pub stats: Stats,
    /// Pids and process groups the daemon owns.
    pub processes: Arc<ProcessTable>,
    /// One permit per running command, `max_concurrent` in all. A permit is
    /// held by its CommandActor and returned on drop, even on panic.
    pub command_slots: Arc<Semaphore>,
    /// One token bucket per client uid; `None` when rate limiting is off.
    /// Keyed by uid, so it holds at most one entry per uid that may connect.
    rate_limiter: RwLock<Option<Arc<governor::DefaultKeyedRateLimiter<u32>>>>,
    /// The daemon's cgroup subtree; `None` when cgroups are off.
    pub cgroups: Option<Arc<Cgroups>>,
    /// The uid pool under `isolation = "uid-per-session"`; `None` when shared.
    pub isolation: Option<Arc<crate::isolation::Isolation>>,
    /// Whether the daemon made itself a child subreaper at start.
    pub subreaper: bool,
    /// Set on SIGTERM: no new sessions or commands.
    draining: AtomicBool,
    /// When the daemon started, for `uptime_ms`.
    pub started: Instant,
    /// Source of session keys. Outside the registry, so a restarted registry
    /// can never hand out a key a live session still holds.
    next_session_key: AtomicU64,
    /// `server.memory_budget`: every byte held for clients is charged here.
    pub budget: Arc<Budget>,
    /// Every session's retained (ended) commands, oldest first, across the
    /// daemon: what is evicted first when a command cannot reserve.
    retained: Mutex<VecDeque<Weak<CommandRecord>>>,
    /// Every live connection's queue of unsent answers, to drop the largest
    /// when an answer cannot be charged.
    pub outboxes: Outboxes,
}

/// What an `OVERLOADED` asks the client to wait: long enough for a command
/// or a slow reader to let go of its share, short enough to stay responsive.
pub const OVERLOADED_RETRY_MS: u64 = 250;

impl Context {
    /// Resolves shell, default cwd and base environment from `config`.
    pub fn new(config: Config) -> Context {
        // The command user: `run_as_user` (validated at load) or the daemon's own.
        let run_as = config.command_user().ok().flatten();
        let credentials = run_as.as_ref().map(|u| Credentials {
            uid: u.uid.as_raw(),
            gid: u.gid.as_raw(),
        });
        let user = run_as.or_else(|| {
            nix::unistd::User::from_uid(nix::unistd::getuid())
                .ok()
                .flatten()
        });
        let home = user
            .as_ref()
            .map(|u| u.dir.clone())
            .unwrap_or_else(|| PathBuf::from("/"));
        let shell = if config.sessions.shell.exists() {
            config.sessions.shell.clone()
        } else {
            tracing::warn!(
                shell = %config.sessions.shell.display(),
                "configured shell is absent; falling back to /bin/sh"
            );
            PathBuf::from("/bin/sh")
        };
        let default_cwd = config
            .sessions
            .default_cwd
            .clone()
            .filter(|d| d.is_dir())
            .unwrap_or_else(|| {
                if home.is_dir() {
                    home.clone()
                } else {
                    PathBuf::from("/")
                }
            });
        let mut base_env: EnvMap = config
            .commands
            .env
            .iter()
            .map(|(k, v)| (k.clone().into_bytes(), v.clone().into_bytes()))
            .collect();
        base_env.insert(b"HOME".to_vec(), home.into_os_string().into_encoded_bytes());
        if let Some(u) = &user {
            base_env.insert(b"USER".to_vec(), u.name.clone().into_bytes());
        }
        // SHELL is the user's login shell from its passwd entry, as a login would set it.
        let login_shell = user
            .as_ref()
            .map_or_else(|| shell.clone(), |u| u.shell.clone());
        base_env.insert(
            b"SHELL".to_vec(),
            login_shell.into_os_string().into_encoded_bytes(),
        );
        let slots = config.commands.max_concurrent;
        let budget = Budget::new(config.server.memory_budget.as_u64());
        let rate_limiter = RwLock::new(rate_limiter(&config.rate_limit));
        let background = BackgroundLimits {
            rate: config.sessions.background_drain_rate.as_u64(),
            max_pipes: config.sessions.max_background_pipes,
        };
        Context {
            live: RwLock::new(Arc::new(config.clone())),
            config,
            shell,
            default_cwd,
            base_env,
            credentials,
            rate_limiter,
            cgroups: None,
            isolation: None,
            subreaper: false,
            stats: Stats::default(),
            processes: Arc::new(ProcessTable::new(background)),
            command_slots: Arc::new(Semaphore::new(slots)),
            draining: AtomicBool::new(false),
            started: Instant::now(),
            next_session_key: AtomicU64::new(1),
            budget,
            retained: Mutex::new(VecDeque::new()),
            outboxes: Outboxes::default(),
        }
    }

    /// The `OVERLOADED` error, counted.
    pub fn overloaded(&self) -> crate::protocol::RequestError {
        crate::stats::Stats::bump(&self.stats.overloaded);
        crate::protocol::RequestError::Overloaded {
            retry_after_ms: OVERLOADED_RETRY_MS,
        }
    }

    /// Reserves `bytes` of the memory budget for a command (or the data of a
    /// waiting `exec.write`), evicting retained output (oldest first, in any
    /// session) until they fit; `OVERLOADED` when they do not fit even with
    /// nothing retained.
    pub fn reserve(&self, bytes: u64) -> Result<Charge, crate::protocol::RequestError> {
        loop {
            if let Some(charge) = self.budget.try_charge(bytes) {
                return Ok(charge);
            }
            if !self.evict_oldest_retained() {
                return Err(self.overloaded());
            }
        }
    }

    /// Charges `bytes` an `exec.read` holds until it is answered: when the
    /// budget is full, the connection with the most unsent answers is dropped
    /// first (counted as a slow reader); `OVERLOADED` if they still do not fit.
    pub fn charge_request(&self, bytes: u64) -> Result<Charge, crate::protocol::RequestError> {
        // Nothing to hold (no new output, or the result alone) always fits.
        if let Some(charge) = self.budget.try_charge(bytes) {
            return Ok(charge);
        }
        if self.outboxes.drop_largest().is_some() {
            crate::stats::Stats::bump(&self.stats.slow_readers_dropped);
        }
        self.budget
            .try_charge(bytes)
            .ok_or_else(|| self.overloaded())
    }

    /// Evicts the oldest retained command still holding output; false when none is left.
    fn evict_oldest_retained(&self) -> bool {
        let mut retained = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        while let Some(record) = retained.pop_front() {
            if let Some(record) = record.upgrade() {
                if record.evict() {
                    tracing::info!(command = %record.id, "retained output evicted under the memory budget");
                    return true;
                }
            }
        }
        false
    }

    /// Lists a command its session now retains (it ended), for eviction.
    pub fn retain(&self, record: &Arc<CommandRecord>) {
        let mut retained = self.retained.lock().unwrap_or_else(|p| p.into_inner());
        // Records pruned by their sessions leave dead entries: sweep them
        // whenever the index doubles, so it stays within twice the live ones.
        if retained.len() >= 64 && retained.len().is_power_of_two() {
            retained.retain(|r| r.strong_count() > 0);
        }
        retained.push_back(Arc::downgrade(record));
    }

    /// Takes one request from `uid`'s budget; the single place that decides
    /// `RATE_LIMITED` (with the time until the next request would be allowed).
    pub fn admit_request(&self, uid: u32) -> Result<(), crate::protocol::RequestError> {
        use governor::clock::Clock;
        let limiter = self.rate_limiter.read().unwrap_or_else(|e| e.into_inner());
        let Some(limiter) = limiter.as_ref() else {
            return Ok(());
        };
        limiter.check_key(&uid).map_err(|not_until| {
            crate::stats::Stats::bump(&self.stats.rate_limited);
            let wait = not_until.wait_time_from(limiter.clock().now());
            crate::protocol::RequestError::RateLimited {
                // Rounded up: waiting exactly this long is enough.
                retry_after_ms: (wait.as_micros().div_ceil(1000) as u64).max(1),
            }
        })
    }

    /// The configuration in force now (see [`Context::live`]'s field doc).
    pub fn live(&self) -> Arc<Config> {
        self.live.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Puts `next` in force (built by [`Config::reloaded`], so its
    /// restart-only keys are ours): new sessions, commands and requests see
    /// it; rate buckets start afresh when `[rate_limit]` changed.
    pub fn set_live(&self, next: Config) {
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if live.rate_limit != next.rate_limit {
            *self.rate_limiter.write().unwrap_or_else(|e| e.into_inner()) =
                rate_limiter(&next.rate_limit);
        }
        self.budget.set_limit(next.server.memory_budget.as_u64());
        *live = Arc::new(next);
    }

    /// Whether the daemon is draining after SIGTERM.
    pub fn draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Starts draining: refuse new sessions and commands from now on.
    pub fn start_draining(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    /// Commands running now.
    pub fn running_commands(&self) -> u64 {
        (self.config.commands.max_concurrent - self.command_slots.available_permits()) as u64
    }

    /// A session key never used before in this daemon's life.
    pub fn new_session_key(&self) -> SessionKey {
        self.next_session_key.fetch_add(1, Ordering::Relaxed)
    }

    /// Milliseconds since start.
    pub fn uptime_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }
}

/// One token bucket per client uid, or `None` when `requests_per_second` is 0.
fn rate_limiter(
    rate: &crate::config::RateLimitConfig,
) -> Option<Arc<governor::DefaultKeyedRateLimiter<u32>>> {
    std::num::NonZeroU32::new(rate.requests_per_second).map(|rps| {
        let burst = std::num::NonZeroU32::new(rate.burst).unwrap_or(rps);
        Arc::new(governor::RateLimiter::keyed(
            governor::Quota::per_second(rps).allow_burst(burst),
        ))
    })
}
