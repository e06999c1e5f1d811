//! What a deployment costs: its replicas' GPUs at a per-product hourly price (the
//! chart's `pricing.gpuHourlyUSD`, passed as `--gpu-price PRODUCT=USD`), and that cost
//! over the tokens it generated in the last window. Pure: the controller passes the
//! placements, the token counter and the time.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use gpuscale_crds::{CostStatus, ReplicaPlacement};

/// The window `$/1M tokens` is measured over: long enough to smooth a burst, short
/// enough to follow a change of load (the HPA's default scale-down window).
pub const TOKEN_WINDOW: Duration = Duration::from_secs(300);

/// Hourly prices by GPU product.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceTable {
    /// (product substring, lowercased; US dollars per GPU-hour).
    entries: Vec<(String, f64)>,
}

impl PriceTable {
    /// Parses `PRODUCT=USD` entries (`H100=2.49`): the product is matched as a
    /// case-insensitive substring of the GPU's product name, the longest key first.
    pub fn parse<S: AsRef<str>>(entries: &[S]) -> Result<PriceTable, String> {
        let mut out = Vec::new();
        for e in entries {
            let e = e.as_ref();
            let (key, price) = e.split_once('=').ok_or_else(|| {
                format!("--gpu-price {e:?}: expected PRODUCT=USD_PER_HOUR, e.g. H100=2.49")
            })?;
            let key = key.trim().to_lowercase();
            let price: f64 = price
                .trim()
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && *p >= 0.0)
                .ok_or_else(|| {
                    format!("--gpu-price {e:?}: {price:?} is not a price in dollars, 0 or more")
                })?;
            if key.is_empty() {
                return Err(format!("--gpu-price {e:?}: the product is empty"));
            }
            if out.iter().any(|(k, _)| *k == key) {
                return Err(format!("--gpu-price {e:?}: {key:?} is priced twice"));
            }
            out.push((key, price));
        }
        // Longest key first: "a100-sxm4-80gb" before "a100".
        out.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.0.cmp(&b.0)));
        Ok(PriceTable { entries: out })
    }

    /// Whether there is no price at all (then status carries no cost).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The hourly price of one GPU of `product`.
    pub fn price(&self, product: &str) -> Option<f64> {
        let p = product.to_lowercase();
        self.entries
            .iter()
            .find(|(k, _)| p.contains(k.as_str()))
            .map(|(_, v)| *v)
    }
}

/// Generated tokens per second over the last [`TOKEN_WINDOW`], from the sum of the
/// replicas' counters sampled each pass. A sum that falls (a replica went, taking its
/// counter) starts the window again.
#[derive(Clone, Debug, Default)]
pub struct TokenRate {
    samples: VecDeque<(Instant, f64)>,
}

impl TokenRate {
    /// Takes the counters' sum at `now`; the rate over the window so far, once it
    /// spans some time.
    pub fn observe(&mut self, now: Instant, total: f64) -> Option<f64> {
        if self.samples.back().is_some_and(|&(_, last)| total < last) {
            self.samples.clear();
        }
        self.samples.push_back((now, total));
        while self.samples.len() > 2
            && self
                .samples
                .get(1)
                .is_some_and(|&(t, _)| now.saturating_duration_since(t) >= TOKEN_WINDOW)
        {
            self.samples.pop_front();
        }
        let &(t0, first) = self.samples.front()?;
        let dt = now.saturating_duration_since(t0).as_secs_f64();
        (dt > 0.0).then(|| (total - first) / dt)
    }
}

/// The cost of `placements` at `prices`, with `tokens_per_second` over the window;
/// `None` without a price table.
pub fn cost(
    placements: &[ReplicaPlacement],
    prices: &PriceTable,
    tokens_per_second: Option<f64>,
) -> Option<CostStatus> {
    if prices.is_empty() {
        return None;
    }
    let (mut hourly, mut unpriced) = (0.0, 0);
    for p in placements.iter().filter(|p| p.gpu_count > 0) {
        match p
            .product
            .as_deref()
            .and_then(|product| prices.price(product))
        {
            Some(price) => hourly += price * f64::from(p.gpu_count),
            None => unpriced += p.gpu_count,
        }
    }
    let tps = tokens_per_second.unwrap_or(0.0).max(0.0);
    let round = |v: f64, places: i32| (v * 10f64.powi(places)).round() / 10f64.powi(places);
    Some(CostStatus {
        dollars_per_hour: round(hourly, 4),
        dollars_per_million_tokens: (tps > 0.0).then(|| round(hourly / (tps * 3600.0) * 1e6, 4)),
        tokens_per_second: round(tps, 2),
        window_seconds: TOKEN_WINDOW.as_secs() as u32,
        unpriced_gpus: unpriced,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use gpuscale_crds::ReplicaState;

    fn placed(product: Option<&str>, gpus: u32) -> ReplicaPlacement {
        ReplicaPlacement {
            pod: "p".into(),
            node: "n".into(),
            gpus: Vec::new(),
            gpu_count: gpus,
            vram_reserved_bytes: 0,
            state: ReplicaState::Ready,
            binding: None,
            claim: None,
            product: product.map(str::to_string),
        }
    }

    #[test]
    fn gpus_are_priced_by_their_product_and_tokens_by_the_hourly_cost() {
        let t = PriceTable::parse(&["A100=1.5", "a100-sxm4-80gb=2.0", "H100=2.5"]).unwrap();
        assert_eq!(
            t.price("NVIDIA A100-SXM4-80GB"),
            Some(2.0),
            "the longest key wins"
        );
        assert_eq!(t.price("NVIDIA A100-PCIE-40GB"), Some(1.5));
        assert_eq!(t.price("NVIDIA L4"), None);
        let placements = [
            placed(Some("NVIDIA H100 80GB HBM3"), 4),
            placed(Some("NVIDIA A100-SXM4-80GB"), 1),
            placed(Some("NVIDIA L4"), 1),
            placed(None, 0), // a CPU replica costs nothing here
        ];
        // 4 x 2.5 + 2.0 = 12 $/h; 1000 tokens/s = 3.6M tokens/h: 3.3333 $/1M tokens.
        let c = cost(&placements, &t, Some(1000.0)).unwrap();
        assert_eq!(c.dollars_per_hour, 12.0);
        assert_eq!(c.dollars_per_million_tokens, Some(3.3333));
        assert_eq!((c.unpriced_gpus, c.window_seconds), (1, 300));
        // No tokens: no per-token cost; no price table: no cost at all.
        assert_eq!(
            cost(&placements, &t, Some(0.0))
                .unwrap()
                .dollars_per_million_tokens,
            None
        );
        assert_eq!(cost(&placements, &PriceTable::default(), Some(5.0)), None);
    }

    #[test]
    fn meaningless_prices_are_refused_naming_the_entry() {
        for (bad, why) in [
            ("H100", "expected PRODUCT=USD_PER_HOUR"),
            ("H100=x", "is not a price"),
            ("H100=-1", "is not a price"),
            ("=2", "the product is empty"),
        ] {
            let e = PriceTable::parse(&[bad]).unwrap_err();
            assert!(e.contains(why) && e.contains("--gpu-price"), "{bad}: {e}");
        }
        let e = PriceTable::parse(&["h100=1", "H100=2"]).unwrap_err();
        assert!(e.contains("priced twice"), "{e}");
    }

    #[test]
    fn the_token_rate_spans_the_window_and_restarts_when_a_counter_goes() {
        let t0 = Instant::now();
        let mut r = TokenRate::default();
        assert_eq!(r.observe(t0, 0.0), None);
        // 10 tokens/s for 10 minutes, sampled every 15 s: the rate over the last 300 s.
        let mut last = None;
        for i in 1..=40u64 {
            last = r.observe(t0 + Duration::from_secs(15 * i), 150.0 * i as f64);
        }
        assert!((last.unwrap() - 10.0).abs() < 1e-9, "{last:?}");
        let span = r.samples.back().unwrap().0 - r.samples.front().unwrap().0;
        assert!(
            span >= TOKEN_WINDOW && span < TOKEN_WINDOW + Duration::from_secs(15),
            "{span:?}"
        );
        // A replica went: the sum fell; the window starts again.
        let now = t0 + Duration::from_secs(615);
        assert_eq!(r.observe(now, 100.0), None);
        assert_eq!(r.observe(now + Duration::from_secs(10), 150.0), Some(5.0));
    }
}
