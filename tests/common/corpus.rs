//! Values of the kinds a Django app caches, made up deterministically (the
//! same bytes for the same size and seed): a pickled session, an HTML page,
//! a JSON API answer, and bytes that are already compressed. Used by the
//! large-value tests and by `benches/compression.rs` (which includes this
//! file by path), so the codec was chosen on the data the tests store.

/// The kinds, by name.
pub const KINDS: [&str; 4] = ["session", "html", "json", "random"];

/// `len` bytes of `kind` (one of [`KINDS`]). Each kind is cut at `len`
/// (a document's end may be missing: no reader parses them).
pub fn value(kind: &str, len: usize, seed: u64) -> Vec<u8> {
    match kind {
        "session" => pickled_session(len, seed),
        "html" => html(len, seed),
        "json" => json(len, seed),
        "random" => random(len, seed),
        other => panic!("no value kind {other}"),
    }
}

fn cut(mut bytes: Vec<u8>, len: usize) -> Vec<u8> {
    bytes.truncate(len);
    bytes
}

/// A small, fast generator (splitmix64): reproducible without a crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }

    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    /// A word of the vocabulary, the common ones far more often (Zipf-like).
    fn word(&mut self) -> &'static str {
        let r = self.below(1 << 20) as f64 / f64::from(1 << 20);
        let i = ((WORDS.len() as f64).powf(r * r) as usize).saturating_sub(1);
        WORDS[i.min(WORDS.len() - 1)]
    }

    fn words(&mut self, n: u64) -> String {
        let n = 1 + self.below(n);
        (0..n).map(|_| self.word()).collect::<Vec<_>>().join(" ")
    }

    fn hex(&mut self, digits: usize) -> String {
        (0..digits)
            .map(|_| char::from(b"0123456789abcdef"[self.below(16) as usize]))
            .collect()
    }
}

const WORDS: &[&str] = &[
    "the",
    "of",
    "and",
    "to",
    "in",
    "a",
    "is",
    "for",
    "on",
    "with",
    "order",
    "customer",
    "product",
    "price",
    "status",
    "shipped",
    "pending",
    "account",
    "user",
    "email",
    "address",
    "city",
    "country",
    "total",
    "item",
    "quantity",
    "description",
    "created",
    "updated",
    "invoice",
    "payment",
    "card",
    "delivery",
    "warehouse",
    "stock",
    "category",
    "electronics",
    "garden",
    "kitchen",
    "books",
    "review",
    "rating",
    "discount",
    "coupon",
    "newsletter",
    "subscription",
    "support",
    "ticket",
    "priority",
    "resolved",
    "message",
    "notification",
    "settings",
    "profile",
    "session",
    "language",
    "currency",
    "timezone",
    "Berlin",
    "Lyon",
    "Osaka",
    "Toronto",
    "Nairobi",
    "Recife",
    "Melbourne",
    "stainless",
    "wireless",
    "organic",
    "premium",
];

/// bytes that no codec can shrink (photos, archives, encrypted blobs).
pub fn random(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    cut(out, len)
}

/// A Django admin change-list page: a table of rows with links, dates and
/// prose, as `render_to_string` gives it (the page and fragment caches).
pub fn html(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = String::from(
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n<title>Select order to change | Shop administration</title>\n<link rel=\"stylesheet\" href=\"/static/admin/css/base.css\">\n<link rel=\"stylesheet\" href=\"/static/admin/css/changelists.css\">\n</head>\n<body class=\"app-shop model-order change-list\">\n<div id=\"container\">\n<table id=\"result_list\">\n<thead><tr><th scope=\"col\" class=\"action-checkbox-column\"><input type=\"checkbox\" id=\"action-toggle\"></th><th scope=\"col\" class=\"sortable column-number\">Number</th><th scope=\"col\">Customer</th><th scope=\"col\">Status</th><th scope=\"col\">Total</th><th scope=\"col\">Created</th></tr></thead>\n<tbody>\n",
    );
    let mut row = 0u64;
    while out.len() < len {
        row += 1;
        let id = 100_000 + rng.below(900_000);
        out.push_str(&format!(
            "<tr class=\"row{}\"><td class=\"action-checkbox\"><input type=\"checkbox\" name=\"_selected_action\" value=\"{id}\" class=\"action-select\"></td><th class=\"field-number\"><a href=\"/admin/shop/order/{id}/change/\">ORD-{id}</a></th><td class=\"field-customer\">{} {}</td><td class=\"field-status\"><span class=\"status-{}\">{}</span></td><td class=\"field-total nowrap\">{}.{:02} EUR</td><td class=\"field-created nowrap\">2026-{:02}-{:02} {:02}:{:02}</td></tr>\n<tr class=\"detail\"><td colspan=\"6\"><p>{}</p></td></tr>\n",
            1 + row % 2,
            rng.word(),
            rng.word(),
            rng.word(),
            rng.word(),
            rng.below(5000),
            rng.below(100),
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.words(30),
        ));
    }
    out.push_str("</tbody>\n</table>\n</div>\n</body>\n</html>\n");
    cut(out.into_bytes(), len)
}

/// A JSON API answer (a list of records), as a serialized query result.
pub fn json(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut out = String::from("{\"count\":0,\"next\":null,\"previous\":null,\"results\":[");
    let mut first = true;
    while out.len() < len {
        if !first {
            out.push(',');
        }
        first = false;
        let id = rng.below(10_000_000);
        out.push_str(&format!(
            "{{\"id\":{id},\"uuid\":\"{}-{}-{}-{}-{}\",\"customer\":{{\"id\":{},\"name\":\"{} {}\",\"email\":\"{}.{}@example.com\",\"city\":\"{}\"}},\"status\":\"{}\",\"total\":\"{}.{:02}\",\"currency\":\"EUR\",\"items\":[{{\"sku\":\"SKU-{}\",\"quantity\":{},\"price\":\"{}.99\"}}],\"created\":\"2026-{:02}-{:02}T{:02}:{:02}:{:02}Z\",\"note\":\"{}\"}}",
            rng.hex(8),
            rng.hex(4),
            rng.hex(4),
            rng.hex(4),
            rng.hex(12),
            rng.below(100_000),
            rng.word(),
            rng.word(),
            rng.word(),
            rng.word(),
            rng.word(),
            rng.word(),
            rng.below(2000),
            rng.below(100),
            rng.below(100_000),
            1 + rng.below(9),
            rng.below(500),
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60),
            rng.below(60),
            rng.words(12),
        ));
    }
    out.push_str("]}");
    cut(out.into_bytes(), len)
}

/// A Django session dict as `PyMemcacheCache` stores it: pickled (protocol
/// 2 opcodes, which Python reads), with the auth keys and a shop's data (a
/// cart, recently viewed products, a half-filled form) that grows the
/// session to `len`.
pub fn pickled_session(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng::new(seed);
    let mut p = Pickle(vec![0x80, 2, b'}']); // PROTO 2, EMPTY_DICT
    p.0.push(b'(');
    p.str("_auth_user_id");
    p.str(&rng.below(1_000_000).to_string());
    p.str("_auth_user_backend");
    p.str("django.contrib.auth.backends.ModelBackend");
    p.str("_auth_user_hash");
    p.str(&rng.hex(64));
    p.str("_session_expiry");
    p.int(1_209_600);
    p.str("django_language");
    p.str("en");
    p.0.push(b'u'); // SETITEMS
    // The growing part: a cart of line dicts and a list of viewed ids.
    p.str("cart");
    p.0.extend_from_slice(b"]("); // EMPTY_LIST, MARK
    let mut lines = 0;
    while p.0.len() + 64 < len {
        p.0.extend_from_slice(b"}(");
        p.str("sku");
        p.str(&format!("SKU-{}", rng.below(100_000)));
        p.str("name");
        p.str(&rng.words(6));
        p.str("quantity");
        p.int(1 + rng.below(5) as i32);
        p.str("price_cents");
        p.int(rng.below(500_000) as i32);
        p.str("added");
        p.str(&format!(
            "2026-{:02}-{:02}T{:02}:{:02}",
            1 + rng.below(12),
            1 + rng.below(28),
            rng.below(24),
            rng.below(60)
        ));
        p.0.push(b'u');
        lines += 1;
        if lines % 500 == 0 {
            // APPENDS in batches, as pickle does.
            p.0.extend_from_slice(b"e(");
        }
    }
    p.0.extend_from_slice(b"es."); // APPENDS, SETITEM, STOP
    cut(p.0, len)
}

struct Pickle(Vec<u8>);

impl Pickle {
    /// BINUNICODE: a str.
    fn str(&mut self, s: &str) {
        self.0.push(b'X');
        self.0.extend_from_slice(&(s.len() as u32).to_le_bytes());
        self.0.extend_from_slice(s.as_bytes());
    }

    /// BININT: an int.
    fn int(&mut self, i: i32) {
        self.0.push(b'J');
        self.0.extend_from_slice(&i.to_le_bytes());
    }
}
