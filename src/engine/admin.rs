//! Commands about the whole cache: `flush_all` (fleet-wide, through a
//! marker item in the store), `stats` and its groups, `cache_memlimit`.

use std::sync::atomic::Ordering;

use bytes::BytesMut;

use super::write::{Done, Op, Refusal};
use super::{Answer, Engine, VERSION, expiry, unix_micros, version_at};
use crate::metrics::{Event, Outcome};
use crate::protocol::{Reply, StatsGroup};
use crate::store::Store;

/// How often a known DynamoDB outage is probed.
const OUTAGE_PROBE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// The key of the item recording the last `flush_all` (its version is the
/// flush time): reserved, no client can name it.
pub const FLUSH_MARKER_KEY: &[u8] = b"dynacache flush_all";

impl<S: Store> Engine<S> {
    /// `flush_all [delay]`: from its time on, no item written before it is
    /// served by any sidecar on the table. The time is recorded in a marker
    /// item (through the write path); items are compared by their version,
    /// which dates their write. Nothing is scanned or deleted: hidden items
    /// go with their TTL or when overwritten.
    pub(super) async fn flush_all(&self, delay: i32, now: u32) -> Answer {
        if !self.options.flush_enabled {
            return Ok((
                Outcome::ClientError,
                Reply::ClientError("flush_all not allowed"),
            ));
        }
        self.counters.record(Event::CmdFlush);
        // memcached reads the delay like an exptime; 0 or less is now.
        let at_micros = match delay {
            d if d <= 0 => unix_micros(),
            d => u64::from(expiry(d, now)) * 1_000_000,
        };
        let before = version_at(at_micros);
        let view = self.view(now);
        match self
            .write(FLUSH_MARKER_KEY, Op::Flush { before }, view)
            .await?
        {
            Done::Written(_) => {}
            // A later flush is already recorded: adopt it.
            Done::Refused(Refusal::AlreadyFlushed, Some(marker)) => {
                self.apply_flush(marker.version)
            }
            Done::Refused(..) => {}
        }
        Ok((Outcome::Ok, Reply::Ok))
    }

    /// Adopts a flush time (ours, or another sidecar's from the marker).
    pub(super) fn apply_flush(&self, flushed_before: u64) {
        let previous = self
            .flushed_before
            .fetch_max(flushed_before, Ordering::SeqCst);
        if flushed_before > previous && flushed_before <= version_at(unix_micros()) {
            // In effect now: free the memory at once rather than entry by entry.
            self.cache.clear();
            if let Some(local) = &self.local {
                local.clear();
            }
        }
    }

    /// Reads the store's flush marker and adopts a newer flush. Run every
    /// `max_local_age` (or 2 s), so a flush through another sidecar is seen
    /// within the same bound as its writes.
    pub async fn refresh_flush_marker(&self) -> Result<(), crate::store::StoreError> {
        let read = self.store.get(FLUSH_MARKER_KEY).await;
        self.note_store(&read);
        let marker = read?.map_or(0, |marker| marker.version);
        if marker > self.flushed_before.load(Ordering::SeqCst) {
            self.apply_flush(marker);
        }
        Ok(())
    }

    /// Background upkeep for as long as the engine serves: the flush marker,
    /// and the fences of writes whose outcome is unknown.
    pub async fn run_upkeep(&self, shutdown: tokio_util::sync::CancellationToken) {
        let period = self.options.flush_poll_period();
        // The first look is the caller's, at start-up.
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let flush_marker = async {
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if let Err(e) = self.refresh_flush_marker().await {
                            tracing::debug!(error = %e, "cannot read the flush_all marker");
                        }
                    }
                }
            }
        };
        // While DynamoDB is known to be failing, aged entries are served
        // without asking it: a read of the marker every second finds out
        // when it answers again.
        let probe = async {
            let mut tick = tokio::time::interval(OUTAGE_PROBE_PERIOD);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {
                        if self.store_down() {
                            let _ = self.refresh_flush_marker().await;
                        }
                    }
                }
            }
        };
        tokio::join!(flush_marker, probe, self.run_fences(&shutdown));
    }

    pub(super) fn cache_memlimit(&self, megabytes: u64) -> (Outcome, Reply<'static>) {
        if megabytes < 8 {
            return (Outcome::ClientError, Reply::MemlimitTooSmall);
        }
        self.cache.set_limit(megabytes << 20);
        (Outcome::Ok, Reply::Ok)
    }

    pub(super) fn stats_reply(&self, group: StatsGroup, out: &mut BytesMut) -> Outcome {
        let mut stat = |name: &str, value: &dyn std::fmt::Display| {
            Reply::Stat(name, &value.to_string()).encode(out);
        };
        let cache = self.cache.stats();
        match group {
            StatsGroup::General => {
                let now = std::time::SystemTime::now();
                let unix = now
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(0, |d| d.as_secs());
                let uptime = now.duration_since(self.started).map_or(0, |d| d.as_secs());
                let (user, system) = rusage();
                stat("pid", &std::process::id());
                stat("uptime", &uptime);
                stat("time", &unix);
                stat("version", &VERSION);
                stat("pointer_size", &(usize::BITS));
                stat("rusage_user", &user);
                stat("rusage_system", &system);
                stat("curr_connections", &self.counters.connections());
                for (name, value) in self.counters.stats() {
                    stat(name, &value);
                }
                stat("limit_maxbytes", &cache.limit_bytes);
                stat(
                    "threads",
                    &std::thread::available_parallelism().map_or(1, |n| n.get()),
                );
                stat("bytes", &cache.bytes);
                stat("curr_items", &cache.items);
                stat("evictions", &cache.evictions);
                stat("reclaimed", &cache.evictions_expired);
                stat("cmd_meta", &0);
            }
            StatsGroup::Settings => {
                stat("maxbytes", &cache.limit_bytes);
                stat("evictions", &"on");
                stat("cas_enabled", &"yes");
                stat(
                    "flush_enabled",
                    &if self.options.flush_enabled {
                        "yes"
                    } else {
                        "no"
                    },
                );
                for (name, value) in &self.options.settings_report {
                    stat(name, value);
                }
            }
            StatsGroup::Items => {
                // One pseudo slab class: the cache has no slabs.
                stat("items:1:number", &cache.items);
                stat("items:1:evicted", &cache.evictions);
                stat("items:1:reclaimed", &cache.evictions_expired);
                stat("items:1:outofmemory", &0);
            }
            StatsGroup::Slabs => {
                stat("1:used_chunks", &cache.items);
                stat("1:mem_requested", &cache.bytes);
                stat("active_slabs", &1);
                stat("total_malloced", &cache.bytes);
            }
            StatsGroup::Sizes => stat("sizes_status", &"disabled"),
            StatsGroup::Reset => {
                self.counters.reset();
                Reply::Reset.encode(out);
                return Outcome::Ok;
            }
            StatsGroup::Detail { dump: false } => {
                Reply::Ok.encode(out);
                return Outcome::Ok;
            }
            StatsGroup::HotKeys => {
                // As `stats items` numbers its classes: by rank, most first;
                // keys escaped so nothing a client wrote can break the reply.
                for (direction, top) in [
                    ("read", self.hot.top_reads()),
                    ("write", self.hot.top_writes()),
                ] {
                    for (rank, hot) in (1..).zip(top) {
                        stat(
                            &format!("{direction}:{rank}:key"),
                            &crate::hotkeys::printable(&hot.key),
                        );
                        stat(&format!("{direction}:{rank}:count"), &hot.count);
                        stat(&format!("{direction}:{rank}:error"), &hot.error);
                    }
                }
            }
            StatsGroup::Conns | StatsGroup::Detail { dump: true } | StatsGroup::Cachedump => {}
        }
        Reply::End.encode(out);
        Outcome::Ok
    }
}

/// CPU time used, as memcached prints it: `seconds.microseconds`.
fn rusage() -> (String, String) {
    use nix::sys::resource::{UsageWho, getrusage};
    match getrusage(UsageWho::RUSAGE_SELF) {
        Ok(usage) => {
            let fmt = |tv: nix::sys::time::TimeVal| format!("{}.{:06}", tv.tv_sec(), tv.tv_usec());
            (fmt(usage.user_time()), fmt(usage.system_time()))
        }
        Err(_) => ("0.000000".into(), "0.000000".into()),
    }
}
