//! Request traces for hit-ratio measurements, one definition for the
//! simulator (`benches/cache_sim.rs`) and the black-box test that holds a
//! real sidecar to it (`tests/hit_ratio.rs`): the same seed gives the same
//! keys, sizes and order in both.
//!
//! Not a module of `tests/common/mod.rs` (the other tests do not need it):
//! included by path where used.
#![allow(dead_code)]

use rand::SeedableRng;
use rand::rngs::SmallRng;
use rand_distr::{Distribution, Zipf};

use dynacache::cache::entry_charge;

/// Seconds added to every trace time, so that no expiry is 0 ("never").
pub const EPOCH: u32 = 1_000_000;

/// One request. Sizes travel with it (a key's sizes never change).
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub key: u64,
    /// Unix seconds.
    pub time: u32,
    /// The item's expiry as the store holds it after this request (for a
    /// get, what a fill would copy); 0 = never.
    pub expires_at: u32,
    pub value_len: u32,
    pub key_len: u8,
    pub set: bool,
}

impl Req {
    /// What the cache charges for this key's entry.
    pub fn charge(&self) -> u64 {
        entry_charge(usize::from(self.key_len) + self.value_len as usize) as u64
    }
}

/// fmix64 of MurmurHash3: spreads a key id over 64 bits.
pub fn mix64(mut x: u64) -> u64 {
    x ^= x >> 33;
    x = x.wrapping_mul(0xff51_afd7_ed55_8ccd);
    x ^= x >> 33;
    x = x.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    x ^ (x >> 33)
}

/// [0, 1) from a hash.
pub fn unit(h: u64) -> f64 {
    (h >> 11) as f64 / (1u64 << 53) as f64
}

/// A log-normal length drawn deterministically from `key` (Box-Muller on
/// two uniforms hashed from it), within 1..=cap.
pub fn lognormal_of(key: u64, mu: f64, sigma: f64, cap: u32) -> u32 {
    let u1 = unit(mix64(key ^ 0xA5A5_0001)).max(1e-12);
    let u2 = unit(mix64(key ^ 0xA5A5_0002));
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    ((mu + sigma * z).exp().round() as u32).clamp(1, cap)
}

/// Sizes of the Zipf and scan traces' keys: key length uniform in 16..=60
/// bytes, value length log-normal (median 100 bytes, sigma 1.0: mean 165,
/// a tenth under 28 bytes, a tenth over 360), within 1..=16384.
pub fn generic_sizes(key: u64) -> (u8, u32) {
    let key_len = 16 + (mix64(key ^ 0x5EED) % 45) as u8;
    (key_len, lognormal_of(key, 100f64.ln(), 1.0, 16_384))
}

/// Zipf(s) ranks over `keys` keys, spread over the key space.
pub fn zipf_ranks(keys: u64, s: f64, rng: &mut SmallRng) -> impl FnMut() -> u64 {
    let zipf = Zipf::new(keys as f64, s).expect("zipf parameters");
    move || (zipf.sample(rng) as u64 - 1).wrapping_mul(0x9E37_79B9_7F4A_7C15) % keys
}

pub fn get_req(key: u64, time: u32, sizes: (u8, u32)) -> Req {
    Req {
        key,
        time,
        expires_at: 0,
        value_len: sizes.1,
        key_len: sizes.0,
        set: false,
    }
}

/// Gets only, Zipf(s) popularity over `keys` keys (independent requests),
/// sizes as [`generic_sizes`].
pub fn zipf_gets(keys: u64, requests: usize, s: f64, seed: u64) -> Vec<Req> {
    let mut rng = SmallRng::seed_from_u64(seed);
    let mut next = zipf_ranks(keys, s, &mut rng);
    (0..requests)
        .map(|_| {
            let k = next();
            get_req(k, EPOCH, generic_sizes(k))
        })
        .collect()
}

/// `len` (16..=64) bytes naming `id` (below 2^60): "k", then the id in hex
/// padded with zeros (a valid memcached key).
pub fn key_bytes(id: u64, len: u8) -> [u8; 64] {
    let mut key = [b'0'; 64];
    key[0] = b'k';
    let mut n = id;
    for b in key[1..usize::from(len).clamp(16, 64)].iter_mut().rev() {
        *b = b"0123456789abcdef"[(n & 15) as usize];
        n >>= 4;
    }
    debug_assert_eq!(n, 0, "key ids fit in 60 bits");
    key
}

/// The charges of all the distinct keys `reqs` asks for.
pub fn working_set(reqs: &[Req]) -> u64 {
    let mut seen = std::collections::HashSet::new();
    reqs.iter()
        .filter(|r| seen.insert(r.key))
        .map(Req::charge)
        .sum()
}
