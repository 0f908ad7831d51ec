//! Fleet mode: sidecars on one table keep each other's memory coherent, so
//! that after a write through any of them is acknowledged, none serves the
//! older value from memory. The design, and why it holds under each fault:
//! docs/fleet.md.
//!
//! This module owns the membership (in DynamoDB, `membership.rs`), the
//! peer connections and their protocol (`wire.rs`), the leases this member
//! holds and grants, and the two questions the engine asks:
//! [`Fleet::coherent`] (may I serve from memory now?) and
//! [`Fleet::acknowledge`] (tell every lease holder of this write, then may
//! I answer it?). It changes the cache only through [`LocalCache`].

pub mod membership;
pub mod wire;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::store::Store;
use membership::Member;
use wire::{Cipher, Msg};

/// Clock rate error allowed between any two hosts (A1 in docs/fleet.md).
const DRIFT: f64 = 0.01;
/// Slack for message handling, on top of the drift.
const SLACK: Duration = Duration::from_millis(50);
/// A member that sent no grant for this many lease terms is evicted.
const EVICT_AFTER_LEASES: u32 = 5;
/// How long to wait for a peer's TCP connection and handshake.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Peer connections accepted at once, and queued messages per connection.
const MAX_PEER_CONNECTIONS: usize = 4096;
const MAX_QUEUED: usize = 65536;

/// What the engine lets the fleet do to the local cache.
pub trait LocalCache: Send + Sync + 'static {
    /// A peer wrote `key`: drop it, end its reads and mark its writes in
    /// flight, keep it uncached while `doubt` says the write may still land.
    fn invalidate(&self, key: &[u8], doubt: Option<(Option<u64>, u64)>);
    /// A peer's `flush_all`.
    fn flush(&self, before: u64);
    /// Coherence is being regained: empty the cache and re-read the
    /// `flush_all` marker; true once done.
    fn regain(&self) -> Pin<Box<dyn Future<Output = bool> + Send + '_>>;
}

/// Fleet settings (the `[fleet]` section).
#[derive(Debug, Clone)]
pub struct FleetOptions {
    pub listen: SocketAddr,
    /// The address peers dial; `listen` if unset.
    pub advertise: String,
    /// A lease's term.
    pub lease: Duration,
    /// How often the membership is read.
    pub membership_period: Duration,
    pub secret: String,
}

impl FleetOptions {
    /// S: a member acknowledges writes only while its last membership read
    /// that listed it began less than this ago.
    pub fn staleness(&self) -> Duration {
        self.membership_period * 3
    }

    /// How long after a member was seen gone its lease stops being needed:
    /// by then it has stopped acknowledging (it reads the membership at
    /// least every S and stops when not listed), on any clock (A1).
    pub fn forget_after(&self) -> Duration {
        self.staleness()
            .mul_f64((1.0 + DRIFT) / (1.0 - DRIFT) / (1.0 - DRIFT))
            + Duration::from_millis(500)
    }
}

/// What the fleet counts (`/metrics`).
#[derive(Default)]
pub struct FleetCounters {
    pub invalidations_sent: AtomicU64,
    pub invalidations_received: AtomicU64,
    pub invalidations_acked: AtomicU64,
    pub invalidations_timed_out: AtomicU64,
    pub leases_granted: AtomicU64,
    pub evictions: AtomicU64,
    pub lapses: AtomicU64,
}

/// An invalidation sent and not acknowledged: when (ms), and who waits.
type Pending = (u64, Option<oneshot::Sender<()>>);

/// A connection a peer opened to ask for our leases: we send it our
/// invalidations.
struct Holder {
    peer: u64,
    /// End of the lease we granted last, on our clock (ms since `started`).
    lease_end: AtomicU64,
    tx: mpsc::Sender<Msg>,
    /// Invalidations sent and not acknowledged: id -> (sent at, waiter).
    pending: Mutex<BTreeMap<u64, Pending>>,
    closed: AtomicBool,
    /// An invalidation could not be queued: no more grants on this link.
    broken: AtomicBool,
    /// Whether we told the peer we count it (`Known`).
    known_sent: AtomicBool,
}

#[derive(Default)]
struct State {
    /// Every member we know of: from membership reads and from hellos.
    members: HashMap<u64, String>,
    /// Members whose lease we need to serve from memory (see docs/fleet.md):
    /// those listed when we joined, and those we told `Known`.
    required: HashSet<u64>,
    /// Lease from each member: end on our clock (ms), while its connection lasts.
    leases: HashMap<u64, u64>,
    /// When we last got a grant from each member (ms), for eviction.
    last_grant: HashMap<u64, u64>,
    /// Members listed when we joined: we acknowledge writes once each told
    /// us `Known` (or is gone).
    must_hear: HashSet<u64>,
    known_by: HashSet<u64>,
    /// Members seen gone: no longer needed after the given time (ms).
    gone: HashMap<u64, u64>,
    /// Start (ms) of the last membership read that listed us.
    listed_at: Option<u64>,
    /// Members with a dialer running.
    dialing: HashSet<u64>,
    joined: bool,
}

pub struct Fleet<S> {
    me: u64,
    options: FleetOptions,
    psk: [u8; 32],
    store: Arc<S>,
    started: Instant,
    /// Serving from memory is allowed while our clock (ms) is below this.
    coherent_until: AtomicU64,
    /// Changes whenever coherence is regained (fills of older reads are refused).
    epoch: AtomicU64,
    state: Mutex<State>,
    holders: Mutex<Vec<Arc<Holder>>>,
    cache: OnceLock<Weak<dyn LocalCache>>,
    next_id: AtomicU64,
    leaving: AtomicBool,
    /// Cancelled when leaving: our dialers tell their peers `Bye`.
    departing: CancellationToken,
    shutdown: CancellationToken,
    changed: Notify,
    pub counters: FleetCounters,
}

impl<S: Store> Fleet<S> {
    /// A fleet member on `store`, whose clock starts at `started` (the
    /// engine's, so both count milliseconds from the same instant).
    pub fn new(options: FleetOptions, store: Arc<S>, started: Instant) -> Arc<Fleet<S>> {
        use std::hash::BuildHasher;
        // Random: a restarted sidecar is a new member.
        let me = std::collections::hash_map::RandomState::new().hash_one(std::process::id()) | 1;
        Arc::new(Fleet {
            me,
            psk: wire::psk(&options.secret),
            options,
            store,
            started,
            coherent_until: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            state: Mutex::new(State::default()),
            holders: Mutex::new(Vec::new()),
            cache: OnceLock::new(),
            next_id: AtomicU64::new(1),
            leaving: AtomicBool::new(false),
            departing: CancellationToken::new(),
            shutdown: CancellationToken::new(),
            changed: Notify::new(),
            counters: FleetCounters::default(),
        })
    }

    /// This member's id.
    pub fn id(&self) -> u64 {
        self.me
    }

    /// Milliseconds on this member's monotonic clock.
    pub fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    fn lease_ms(&self) -> u64 {
        self.options.lease.as_millis() as u64
    }

    /// Whether a cached entry may be served now without asking DynamoDB.
    pub fn coherent(&self, now_ms: u64) -> bool {
        now_ms < self.coherent_until.load(Ordering::SeqCst)
    }

    /// The coherence epoch: a fill is kept only if the epoch at its read's
    /// start is still current (and the member still coherent).
    pub fn epoch(&self) -> u64 {
        self.epoch.load(Ordering::SeqCst)
    }

    /// Members known, leases held, and leases missing (for metrics).
    pub fn view(&self) -> (usize, usize, usize) {
        let now = self.now_ms();
        let state = self.lock();
        let needed: Vec<u64> = self.needed(&state, now);
        let held = needed
            .iter()
            .filter(|m| state.leases.get(m).is_some_and(|&end| end > now))
            .count();
        (state.members.len(), held, needed.len() - held)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Members whose lease is needed now.
    fn needed(&self, state: &State, now: u64) -> Vec<u64> {
        state
            .required
            .iter()
            .copied()
            .filter(|m| *m != self.me && state.gone.get(m).is_none_or(|&after| now < after))
            .collect()
    }

    /// Whether a write may be acknowledged now (see docs/fleet.md, Writes).
    pub fn may_acknowledge(&self) -> bool {
        if self.leaving.load(Ordering::SeqCst) {
            return false;
        }
        let now = self.now_ms();
        let state = self.lock();
        let listed = state
            .listed_at
            .is_some_and(|at| now.saturating_sub(at) < self.options.staleness().as_millis() as u64);
        // Every member we joined must count us (it requires our lease, so
        // our invalidations reach it), or be gone long enough to have
        // stopped serving and acknowledging.
        state.joined
            && listed
            && state.must_hear.iter().all(|m| {
                state.known_by.contains(m) || state.gone.get(m).is_some_and(|&after| now >= after)
            })
    }

    /// Waits up to `limit` for [`Fleet::may_acknowledge`].
    pub async fn writable(&self, limit: Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            if self.may_acknowledge() {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Tells every current lease holder that `key` was written (or, with
    /// `doubt`, may be written later) and waits until each acknowledged or
    /// its lease ended on our clock.
    pub async fn acknowledge(&self, key: &[u8], doubt: Option<(Option<u64>, u64)>) {
        self.broadcast(|id| Msg::Invalidate {
            id,
            key: key.to_vec(),
            doubt,
        })
        .await;
    }

    /// [`Fleet::acknowledge`] for a `flush_all`.
    pub async fn flush(&self, before: u64) {
        self.broadcast(|id| Msg::Flush { id, before }).await;
    }

    async fn broadcast(&self, make: impl Fn(u64) -> Msg) {
        let started = Instant::now();
        let now = self.now_ms();
        let targets: Vec<Arc<Holder>> = self
            .holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .filter(|h| h.lease_end.load(Ordering::SeqCst) > now)
            .cloned()
            .collect();
        let mut waits = Vec::with_capacity(targets.len());
        // Senders of waits no acknowledgement may end (kept until the end).
        let mut unreleasable = Vec::new();
        for holder in targets {
            let (tx, rx) = oneshot::channel();
            {
                // An acknowledgement covers every id up to its own, so ids
                // are queued in order: taken and sent under the lock.
                let mut pending = holder.pending.lock().unwrap_or_else(|e| e.into_inner());
                let id = self.next_id.fetch_add(1, Ordering::SeqCst);
                if !holder.broken.load(Ordering::SeqCst) && holder.tx.try_send(make(id)).is_ok() {
                    pending.insert(id, (now, Some(tx)));
                } else {
                    // A full or closed queue: the message is lost, so no
                    // later acknowledgement may stand for it. The link gets
                    // no more grants, and this write waits out its lease.
                    holder.broken.store(true, Ordering::SeqCst);
                    unreleasable.push(tx);
                }
            }
            self.counters
                .invalidations_sent
                .fetch_add(1, Ordering::Relaxed);
            waits.push(self.wait_ack(holder, rx));
        }
        if !waits.is_empty() {
            futures_util::future::join_all(waits).await;
            drop(unreleasable);
            metrics::histogram!(crate::metrics::FLEET_ACK_WAIT)
                .record(started.elapsed().as_secs_f64());
        }
    }

    /// Waits for one acknowledgement, or for the end of the holder's lease
    /// (re-read: a renewal on a live connection extends it, see grants).
    async fn wait_ack(&self, holder: Arc<Holder>, mut rx: oneshot::Receiver<()>) {
        loop {
            let end = holder.lease_end.load(Ordering::SeqCst) + SLACK.as_millis() as u64;
            let now = self.now_ms();
            if now >= end {
                self.counters
                    .invalidations_timed_out
                    .fetch_add(1, Ordering::Relaxed);
                return;
            }
            tokio::select! {
                acked = &mut rx => {
                    if acked.is_ok() {
                        self.counters.invalidations_acked.fetch_add(1, Ordering::Relaxed);
                    }
                    return;
                }
                _ = tokio::time::sleep(Duration::from_millis(end - now)) => {}
            }
        }
    }

    /// Starts the fleet: binds the peer port, registers in the membership,
    /// and runs the peers, leases and membership reads in the background.
    /// `cache` is the engine the fleet invalidates.
    pub async fn start(self: &Arc<Self>, cache: Weak<dyn LocalCache>) -> Result<(), String> {
        let _ = self.cache.set(cache);
        let listener = TcpListener::bind(self.options.listen).await.map_err(|e| {
            format!(
                "cannot listen for fleet peers on {}: {e}",
                self.options.listen
            )
        })?;
        tokio::spawn(self.clone().accept(listener));
        tokio::spawn(self.clone().run_membership());
        tokio::spawn(self.clone().run_coherence());
        tracing::info!(member = format!("{:016x}", self.me), listen = %self.options.listen, advertise = %self.options.advertise, "fleet mode: joining");
        Ok(())
    }

    /// Leaves the fleet: stops acknowledging, tells peers, removes itself
    /// from the membership.
    pub async fn leave(&self) {
        // Nothing from memory, no acknowledgement, no grant from now on: so
        // peers need neither our lease nor our acknowledgements.
        self.leaving.store(true, Ordering::SeqCst);
        self.coherent_until.store(0, Ordering::SeqCst);
        // Out of the membership first: a peer that gets our `Bye` and then
        // still reads us listed would take us for a member that rejoined.
        let me = self.me;
        if let Err(e) = membership::update(&*self.store, |m| m.retain(|m| m.id != me)).await {
            tracing::warn!(error = %e, "cannot remove this member from the fleet's membership");
        }
        self.departing.cancel();
        for holder in self
            .holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            let _ = holder.tx.try_send(Msg::Bye);
        }
        // Let the byes go out before the process ends.
        tokio::time::sleep(Duration::from_millis(50)).await;
        self.shutdown.cancel();
    }

    // ---- membership --------------------------------------------------

    async fn run_membership(self: Arc<Self>) {
        let mut registered = false;
        let mut first = true;
        let mut tick = tokio::time::interval(self.options.membership_period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            if self.leaving.load(Ordering::SeqCst) {
                return;
            }
            if !registered {
                // Register, then read: of two members joining at once, the
                // later reader sees the other (docs/fleet.md, Joining).
                match self.register().await {
                    Ok(()) => registered = true,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot register in the fleet's membership yet");
                        continue;
                    }
                }
            }
            let began = self.now_ms();
            let roster = match membership::read(&*self.store).await {
                Ok(roster) => roster,
                Err(e) => {
                    tracing::debug!(error = %e, "cannot read the fleet's membership");
                    continue;
                }
            };
            let ended = self.now_ms();
            if !roster.contains(self.me) {
                self.evicted();
                registered = false;
                first = true;
                continue;
            }
            self.read_roster(&roster, began, ended, first);
            first = false;
            self.evict_silent().await;
            self.changed.notify_one();
        }
    }

    async fn register(&self) -> Result<(), crate::store::StoreError> {
        let me = Member {
            id: self.me,
            addr: self.options.advertise.clone(),
        };
        membership::update(&*self.store, |m| {
            if !m.iter().any(|x| x.id == me.id) {
                m.push(me.clone());
            }
        })
        .await
        .map(|_| ())
    }

    /// Applies a membership read that began at `began` and ended at `ended`.
    fn read_roster(
        self: &Arc<Self>,
        roster: &membership::Roster,
        began: u64,
        ended: u64,
        first: bool,
    ) {
        let forget = self.options.forget_after().as_millis() as u64;
        let mut dial = Vec::new();
        let mut rejoined = Vec::new();
        {
            let mut state = self.lock();
            state.listed_at = Some(began);
            let listed: HashSet<u64> = roster.members.iter().map(|m| m.id).collect();
            for member in &roster.members {
                if member.id == self.me {
                    continue;
                }
                if state.gone.remove(&member.id).is_some() {
                    // Evicted, and registered again: it reset its state (it
                    // stopped acknowledging when it found itself evicted)
                    // and joins as new. It needs our `Known` again, and our
                    // writes no longer wait for its; we keep needing its
                    // lease (more caution, never less).
                    state.must_hear.remove(&member.id);
                    state.known_by.remove(&member.id);
                    state.last_grant.remove(&member.id);
                    rejoined.push(member.id);
                }
                state.members.insert(member.id, member.addr.clone());
                if first {
                    // The members we join: we need their leases to serve,
                    // and their `Known` to acknowledge.
                    state.required.insert(member.id);
                    state.must_hear.insert(member.id);
                }
                if state.dialing.insert(member.id) {
                    dial.push(member.id);
                }
            }
            if first {
                state.joined = true;
            }
            let gone: Vec<u64> = state
                .members
                .keys()
                .copied()
                .filter(|id| !listed.contains(id) && !state.gone.contains_key(id))
                .collect();
            for id in gone {
                state.gone.insert(id, ended + forget);
            }
        }
        if !rejoined.is_empty() {
            // Say `Known` again at its next grant.
            for holder in self
                .holders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .iter()
                .filter(|h| rejoined.contains(&h.peer))
            {
                holder.known_sent.store(false, Ordering::SeqCst);
            }
        }
        for id in dial {
            tokio::spawn(self.clone().dial(id));
        }
    }

    /// We are no longer listed: someone evicted us. Stop serving from memory
    /// and acknowledging, forget what we knew, and join again as if new
    /// (the cache is emptied when coherence is regained).
    fn evicted(&self) {
        tracing::warn!(
            "this member was evicted from the fleet (unreachable for too long); joining again with an empty cache"
        );
        self.coherent_until.store(0, Ordering::SeqCst);
        let mut state = self.lock();
        let dialing = std::mem::take(&mut state.dialing);
        *state = State {
            dialing,
            ..State::default()
        };
    }

    /// Evicts members that sent no grant for `EVICT_AFTER_LEASES` terms.
    ///
    /// Only a member that may acknowledge writes evicts: one that no peer
    /// counts (a wrong secret, an address no peer can dial) would otherwise
    /// evict every healthy member for not granting it leases.
    async fn evict_silent(self: &Arc<Self>) {
        if !self.may_acknowledge() {
            return;
        }
        let now = self.now_ms();
        let silence = self.lease_ms() * u64::from(EVICT_AFTER_LEASES);
        let silent: Vec<u64> = {
            let mut state = self.lock();
            let candidates: Vec<u64> = state
                .members
                .keys()
                .copied()
                .filter(|id| !state.gone.contains_key(id))
                .collect();
            let mut silent = Vec::new();
            for id in candidates {
                // The silence is counted from when we first knew it.
                let last = *state.last_grant.entry(id).or_insert(now);
                if now.saturating_sub(last) > silence {
                    silent.push(id);
                }
            }
            silent
        };
        for id in silent {
            match membership::update(&*self.store, |m| m.retain(|m| m.id != id)).await {
                Ok(_) => {
                    let forget = self.options.forget_after().as_millis() as u64;
                    self.lock().gone.insert(id, self.now_ms() + forget);
                    self.counters.evictions.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        member = format!("{id:016x}"),
                        "evicted a silent fleet member"
                    );
                }
                Err(e) => tracing::debug!(error = %e, "cannot evict a silent member yet"),
            }
        }
    }

    // ---- coherence ---------------------------------------------------

    /// Keeps `coherent_until` at the end of the shortest lease needed, and
    /// regains coherence (empty cache, marker re-read, new epoch) after any
    /// lapse.
    async fn run_coherence(self: Arc<Self>) {
        let period = self.options.lease / 10;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = self.changed.notified() => {}
                _ = tokio::time::sleep(period) => {}
            }
            if !self.coherence_step().await {
                return;
            }
        }
    }

    /// One look at the leases: extends, ends or regains coherence. False
    /// when there is nothing to do any more (leaving, or the engine gone).
    async fn coherence_step(&self) -> bool {
        if self.leaving.load(Ordering::SeqCst) {
            return false;
        }
        let now = self.now_ms();
        let until = self.coherence_deadline(now);
        let current = self.coherent_until.load(Ordering::SeqCst);
        if until <= now {
            if current > now {
                // Lost: the hit path stops at `current` anyway; stop now.
                self.coherent_until.store(0, Ordering::SeqCst);
            }
            return true;
        }
        if current > now {
            // Continuous: extend (or shorten) the deadline.
            self.coherent_until.store(until, Ordering::SeqCst);
            return true;
        }
        // Regained after a lapse (or for the first time).
        self.epoch.fetch_add(1, Ordering::SeqCst);
        let Some(cache) = self.cache.get().and_then(Weak::upgrade) else {
            return false;
        };
        if !cache.regain().await {
            return true;
        }
        self.counters.lapses.fetch_add(1, Ordering::Relaxed);
        let now = self.now_ms();
        let until = self.coherence_deadline(now);
        if until > now {
            self.coherent_until.store(until, Ordering::SeqCst);
            tracing::debug!("coherent: serving from memory");
        }
        true
    }

    /// Until when every needed lease is held (0: one is missing).
    fn coherence_deadline(&self, now: u64) -> u64 {
        let state = self.lock();
        if !state.joined {
            return 0;
        }
        let mut until = u64::MAX;
        for member in self.needed(&state, now) {
            match state.leases.get(&member) {
                Some(&end) => until = until.min(end),
                None => return 0,
            }
        }
        // Alone, a member needs no lease; the deadline is renewed by this
        // task like any other.
        until.min(now + self.lease_ms())
    }

    // ---- peers: dialing (we ask for leases) --------------------------

    async fn dial(self: Arc<Self>, peer: u64) {
        let mut backoff = Duration::from_millis(50);
        loop {
            let addr = {
                let state = self.lock();
                if !state.members.contains_key(&peer) || state.gone.contains_key(&peer) {
                    let mut state = state;
                    state.dialing.remove(&peer);
                    return;
                }
                state.members[&peer].clone()
            };
            if self.departing.is_cancelled() {
                return;
            }
            match self.clone().session(peer, &addr).await {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(e) => {
                    tracing::debug!(peer = format!("{peer:016x}"), error = %e, "fleet peer connection ended")
                }
            }
            // The connection is gone: so is its lease, and invalidations
            // may have been lost with it. Coherence ends now (not at the
            // next look at the leases, which a grant on a new connection
            // could precede), so it is regained with an emptied cache.
            let lost = {
                let now = self.now_ms();
                let mut state = self.lock();
                state.leases.remove(&peer).is_some() && self.needed(&state, now).contains(&peer)
            };
            if lost {
                self.coherent_until.store(0, Ordering::SeqCst);
            }
            self.changed.notify_one();
            tokio::select! {
                _ = self.departing.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(1));
        }
    }

    /// One connection to `peer`: lease requests out; grants, invalidations
    /// and flushes in.
    async fn session(self: Arc<Self>, peer: u64, addr: &str) -> Result<(), String> {
        let connect = async {
            let mut stream = TcpStream::connect(addr).await.map_err(|e| e.to_string())?;
            let _ = stream.set_nodelay(true);
            let cipher = Cipher::connect(&mut stream, &self.psk)
                .await
                .map_err(|e| e.to_string())?;
            Ok::<_, String>((stream, cipher))
        };
        let (stream, cipher) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| "connect timed out".to_string())??;
        let (mut rd, mut wr) = stream.into_split();
        cipher
            .send(&mut wr, &[Msg::Hello { member: self.me }])
            .await
            .map_err(|e| e.to_string())?;
        match tokio::time::timeout(CONNECT_TIMEOUT, cipher.recv(&mut rd)).await {
            Ok(Ok(msgs)) if msgs.first() == Some(&Msg::Welcome { member: peer }) => {}
            Ok(Ok(_)) => return Err("another member answers at this address".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no welcome".into()),
        }
        let lease = self.lease_ms();
        let renew = self.options.lease / 3;
        let mut sent: BTreeMap<u64, u64> = BTreeMap::new();
        let mut seq = 0u64;
        let mut tick = tokio::time::interval(renew);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.departing.cancelled() => {
                    // We hold no lease any more: its writes need not wait for us.
                    let _ = cipher.send(&mut wr, &[Msg::Bye]).await;
                    return Ok(());
                }
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = tick.tick() => {
                    seq += 1;
                    sent.insert(seq, self.now_ms());
                    // Requests older than a lease are useless: forget them.
                    let now = self.now_ms();
                    sent.retain(|_, at| now.saturating_sub(*at) < lease);
                    cipher.send(&mut wr, &[Msg::LeaseRequest { seq }]).await.map_err(|e| e.to_string())?;
                }
                msgs = cipher.recv(&mut rd) => {
                    let msgs = msgs.map_err(|e| e.to_string())?;
                    let mut ack = None;
                    for msg in msgs {
                        match msg {
                            Msg::Grant { seq, millis } => {
                                if let Some(asked) = sent.remove(&seq) {
                                    self.granted(peer, asked, millis);
                                }
                            }
                            Msg::Invalidate { id, key, doubt } => {
                                self.counters.invalidations_received.fetch_add(1, Ordering::Relaxed);
                                if let Some(cache) = self.cache.get().and_then(Weak::upgrade) {
                                    cache.invalidate(&key, doubt);
                                }
                                ack = Some(id);
                            }
                            Msg::Flush { id, before } => {
                                if let Some(cache) = self.cache.get().and_then(Weak::upgrade) {
                                    cache.flush(before);
                                }
                                ack = Some(id);
                            }
                            Msg::Known => {
                                self.lock().known_by.insert(peer);
                            }
                            Msg::Bye => {
                                // It acknowledges nothing any more.
                                let now = self.now_ms();
                                let mut state = self.lock();
                                state.gone.insert(peer, now);
                                state.leases.remove(&peer);
                                drop(state);
                                self.changed.notify_one();
                                return Ok(());
                            }
                            _ => return Err("unexpected message".into()),
                        }
                    }
                    if let Some(id) = ack {
                        cipher.send(&mut wr, &[Msg::Ack { id }]).await.map_err(|e| e.to_string())?;
                    }
                }
            }
        }
    }

    /// A grant from `peer` for a request sent at `asked` (our clock): the
    /// lease is ours until `asked + millis·(1−2·DRIFT) − SLACK`, which ends
    /// before the grantor's own record of it (docs/fleet.md, Leases).
    fn granted(&self, peer: u64, asked: u64, millis: u32) {
        let term = (f64::from(millis) * (1.0 - 2.0 * DRIFT)) as u64;
        let end = (asked + term).saturating_sub(SLACK.as_millis() as u64);
        let now = self.now_ms();
        let mut state = self.lock();
        state.last_grant.insert(peer, now);
        if end <= now {
            return;
        }
        let held = state.leases.entry(peer).or_insert(0);
        *held = (*held).max(end);
        self.maybe_known(&mut state, peer, now);
        drop(state);
        self.changed.notify_one();
    }

    /// Holding `peer`'s lease, we can count it as a member whose writes we
    /// wait for: from now on we need its lease to serve (it is `required`),
    /// and we tell it so (`Known`) on the connection it opened to us, after
    /// which it may acknowledge writes.
    fn maybe_known(&self, state: &mut State, peer: u64, now: u64) {
        if state.leases.get(&peer).is_none_or(|&end| end <= now) {
            return;
        }
        let holders = self.holders.lock().unwrap_or_else(|e| e.into_inner());
        for holder in holders
            .iter()
            .filter(|h| h.peer == peer && !h.closed.load(Ordering::SeqCst))
        {
            state.required.insert(peer);
            if !holder.known_sent.swap(true, Ordering::SeqCst) {
                let _ = holder.tx.try_send(Msg::Known);
            }
        }
    }

    // ---- peers: accepting (we grant leases) --------------------------

    async fn accept(self: Arc<Self>, listener: TcpListener) {
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_PEER_CONNECTIONS));
        loop {
            let (stream, from) = tokio::select! {
                _ = self.shutdown.cancelled() => return,
                accepted = listener.accept() => match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::debug!(error = %e, "fleet accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                continue;
            };
            let fleet = self.clone();
            tokio::spawn(async move {
                if let Err(e) = fleet.serve_peer(stream).await {
                    tracing::debug!(%from, error = %e, "fleet peer dropped");
                }
                drop(slot);
            });
        }
    }

    async fn serve_peer(self: Arc<Self>, mut stream: TcpStream) -> Result<(), String> {
        let _ = stream.set_nodelay(true);
        let cipher = tokio::time::timeout(CONNECT_TIMEOUT, Cipher::accept(&mut stream, &self.psk))
            .await
            .map_err(|_| "handshake timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let (mut rd, mut wr) = stream.into_split();
        let peer = match tokio::time::timeout(CONNECT_TIMEOUT, cipher.recv(&mut rd)).await {
            Ok(Ok(msgs)) => match msgs.first() {
                Some(Msg::Hello { member }) if *member != self.me => *member,
                _ => return Err("no hello".into()),
            },
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => return Err("no hello".into()),
        };
        cipher
            .send(&mut wr, &[Msg::Welcome { member: self.me }])
            .await
            .map_err(|e| e.to_string())?;
        let (tx, mut rx) = mpsc::channel(MAX_QUEUED);
        let holder = Arc::new(Holder {
            peer,
            lease_end: AtomicU64::new(0),
            tx,
            pending: Mutex::new(BTreeMap::new()),
            closed: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            known_sent: AtomicBool::new(false),
        });
        self.holders
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(holder.clone());
        // If we hold its lease already, say `Known` now; else when we get
        // it (we dial every member the membership lists).
        {
            let now = self.now_ms();
            let mut state = self.lock();
            self.maybe_known(&mut state, peer, now);
        }
        let writer = {
            let cipher = &cipher;
            async move {
                let mut batch = Vec::new();
                while rx.recv_many(&mut batch, 1024).await > 0 {
                    cipher
                        .send(&mut wr, &batch)
                        .await
                        .map_err(|e| e.to_string())?;
                    batch.clear();
                }
                Ok::<(), String>(())
            }
        };
        let reader = {
            let cipher = &cipher;
            let holder = holder.clone();
            let fleet = self.clone();
            async move {
                let lease = fleet.lease_ms();
                loop {
                    let msgs = cipher.recv(&mut rd).await.map_err(|e| e.to_string())?;
                    for msg in msgs {
                        match msg {
                            Msg::LeaseRequest { seq } => {
                                let now = fleet.now_ms();
                                // A connection that leaves an invalidation
                                // unacknowledged for a third of a lease gets
                                // no more: its lease, and the wait, end.
                                let stuck = holder
                                    .pending
                                    .lock()
                                    .unwrap_or_else(|e| e.into_inner())
                                    .values()
                                    .next()
                                    .is_some_and(|(at, _)| now.saturating_sub(*at) > lease / 3);
                                if stuck
                                    || holder.broken.load(Ordering::SeqCst)
                                    || fleet.leaving.load(Ordering::SeqCst)
                                {
                                    continue;
                                }
                                holder.lease_end.fetch_max(now + lease, Ordering::SeqCst);
                                fleet
                                    .counters
                                    .leases_granted
                                    .fetch_add(1, Ordering::Relaxed);
                                let millis = u32::try_from(lease).unwrap_or(u32::MAX);
                                let _ = holder.tx.try_send(Msg::Grant { seq, millis });
                            }
                            Msg::Bye => {
                                // The peer left and serves nothing from
                                // memory: its lease ends now, and with it
                                // the waits for its acknowledgements.
                                holder.lease_end.store(0, Ordering::SeqCst);
                                let waiters: Vec<_> = std::mem::take(
                                    &mut *holder.pending.lock().unwrap_or_else(|e| e.into_inner()),
                                )
                                .into_values()
                                .filter_map(|(_, waiter)| waiter)
                                .collect();
                                for waiter in waiters {
                                    let _ = waiter.send(());
                                }
                                return Ok(());
                            }
                            Msg::Ack { id } => {
                                let mut pending =
                                    holder.pending.lock().unwrap_or_else(|e| e.into_inner());
                                let done: Vec<u64> =
                                    pending.range(..=id).map(|(k, _)| *k).collect();
                                for k in done {
                                    if let Some((_, Some(waiter))) = pending.remove(&k) {
                                        let _ = waiter.send(());
                                    }
                                }
                            }
                            _ => return Err::<(), String>("unexpected message".into()),
                        }
                    }
                }
            }
        };
        let result = tokio::select! {
            r = writer => r,
            r = reader => r,
            _ = self.shutdown.cancelled() => Ok(()),
        };
        holder.closed.store(true, Ordering::SeqCst);
        // Its lease stays recorded until it ends: writes wait it out.
        let fleet = self.clone();
        let lingering = holder.clone();
        tokio::spawn(async move {
            let end = lingering.lease_end.load(Ordering::SeqCst);
            let now = fleet.now_ms();
            tokio::time::sleep(Duration::from_millis(end.saturating_sub(now) + 1000)).await;
            fleet
                .holders
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .retain(|h| !Arc::ptr_eq(h, &lingering));
        });
        result
    }
}

/// Seams for the engine's unit tests: a fleet that is never started, whose
/// one peer's lease the test grants and takes away.
#[cfg(test)]
impl<S: Store> Fleet<S> {
    const TEST_PEER: u64 = 2;

    pub(crate) fn test_attach(&self, cache: Weak<dyn LocalCache>) {
        let _ = self.cache.set(cache);
    }

    /// As if joined and listed, holding the peer's lease for `millis` from
    /// now (0: not holding it); then one look at the leases.
    pub(crate) async fn test_lease(&self, millis: u64) {
        let now = self.now_ms();
        {
            let mut state = self.lock();
            state.joined = true;
            state.listed_at = Some(now);
            state.required.insert(Self::TEST_PEER);
            if millis == 0 {
                state.leases.remove(&Self::TEST_PEER);
            } else {
                state.leases.insert(Self::TEST_PEER, now + millis);
            }
        }
        self.coherence_step().await;
    }
}

impl<S: Store> Fleet<S> {
    /// Appends the fleet's Prometheus text.
    pub fn render(&self, out: &mut String) {
        use std::fmt::Write as _;
        let (members, held, missing) = self.view();
        let c = &self.counters;
        let gauges = [
            (
                "dynacache_fleet_members",
                "Fleet members this one knows (itself excluded).",
                members as u64,
            ),
            (
                "dynacache_fleet_leases_held",
                "Peers' leases held now.",
                held as u64,
            ),
            (
                "dynacache_fleet_leases_missing",
                "Peers' leases needed and not held (while any is, memory is not served).",
                missing as u64,
            ),
            (
                "dynacache_fleet_coherent",
                "1 while this member serves from memory.",
                u64::from(self.coherent(self.now_ms())),
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let counters = [
            (
                "dynacache_fleet_invalidations_sent_total",
                "Invalidations (and flushes) sent to peers.",
                &c.invalidations_sent,
            ),
            (
                "dynacache_fleet_invalidations_received_total",
                "Invalidations received from peers.",
                &c.invalidations_received,
            ),
            (
                "dynacache_fleet_invalidations_acked_total",
                "Invalidations peers acknowledged.",
                &c.invalidations_acked,
            ),
            (
                "dynacache_fleet_invalidations_timed_out_total",
                "Invalidations whose peer's lease ended first (the write was answered then).",
                &c.invalidations_timed_out,
            ),
            (
                "dynacache_fleet_leases_granted_total",
                "Leases granted to peers.",
                &c.leases_granted,
            ),
            (
                "dynacache_fleet_evictions_total",
                "Silent members this one removed from the membership.",
                &c.evictions,
            ),
            (
                "dynacache_fleet_coherence_regained_total",
                "Times coherence was (re)gained, each emptying the cache.",
                &c.lapses,
            ),
        ];
        for (name, help, value) in counters {
            let n = value.load(Ordering::Relaxed);
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {n}"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn options() -> FleetOptions {
        FleetOptions {
            listen: "127.0.0.1:0".parse().unwrap(),
            advertise: "127.0.0.1:0".into(),
            lease: Duration::from_secs(1),
            membership_period: Duration::from_secs(1),
            secret: "s".into(),
        }
    }

    #[test]
    fn a_holder_s_lease_ends_before_the_grantor_s_record() {
        let fleet = Fleet::new(
            options(),
            Arc::new(crate::store::MemoryStore::new()),
            Instant::now(),
        );
        // Asked at 1000 ms (our clock), granted 1000 ms: ours until at most
        // 1000 + 980 - 50. The grantor granted after we asked, so its record
        // ends after 2000 on its clock, and 1930 ms of ours are at most
        // 1930·(1+1%) = 1949 of its ms since our request.
        fleet.lock().joined = true;
        fleet.granted(7, 1000, 1000);
        let end = fleet.lock().leases[&7];
        assert_eq!(end, 1000 + 980 - 50);
        assert!((end - 1000) as f64 * (1.0 + DRIFT) < 1000.0);
    }

    #[test]
    fn forgetting_a_gone_member_outlasts_its_acknowledgements() {
        let o = options();
        // It stops acknowledging within S of its clock after it was removed,
        // which is at most S·(1+ε) of ours.
        assert!(o.forget_after() > o.staleness().mul_f64(1.0 + DRIFT));
    }

    #[test]
    fn coherence_needs_every_required_lease() {
        let fleet = Fleet::new(
            options(),
            Arc::new(crate::store::MemoryStore::new()),
            Instant::now(),
        );
        let now = 10_000;
        {
            let mut state = fleet.lock();
            state.joined = true;
            state.listed_at = Some(now);
            state.required.extend([1, 2]);
            state.leases.insert(1, now + 500);
        }
        assert_eq!(fleet.coherence_deadline(now), 0, "no lease from 2");
        fleet.lock().leases.insert(2, now + 300);
        assert_eq!(fleet.coherence_deadline(now), now + 300, "the shortest");
        fleet.lock().gone.insert(2, now);
        assert_eq!(
            fleet.coherence_deadline(now),
            now + 500,
            "2 is gone and forgotten"
        );
    }
}
