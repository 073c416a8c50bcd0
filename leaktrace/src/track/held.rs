//! What a stack holds, as distributions: the ages and the sizes of its outstanding blocks, in
//! HdrHistograms built at snapshot time from the blocks themselves (never kept per stack while
//! tracing). A leak holds blocks of every age up to its window; a cache holds young blocks it
//! replaces; a pool holds old blocks whose number does not grow.
//!
//! One significant figure (a value is known within 1/16, ~6%) keeps a histogram near 1 KiB
//! for ages up to an hour and sizes up to a mebibyte; it grows only as large values come.
use hdrhistogram::Histogram;
use serde::ser::{Serialize, SerializeStruct, Serializer};

/// Significant figures kept: values within 1/16 of their true value.
const SIGFIG: u8 = 1;

/// The ages (milliseconds) and sizes (bytes) of the outstanding blocks of one stack.
#[derive(Clone, Debug)]
pub struct Held {
    ages_ms: Histogram<u32>,
    sizes: Histogram<u32>,
    /// The exact youngest and oldest ages and smallest and largest sizes (the histograms
    /// know them within 1/16): quantiles stay within them.
    min_age_ms: u64,
    max_age_ms: u64,
    min_size: u64,
    max_size: u64,
}

/// Quantiles of a [`Held`] distribution, as reports show them.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Quantiles {
    /// The median (the lowest value of its bucket: within 1/16 below).
    pub p50: u64,
    /// The 90th percentile (likewise).
    pub p90: u64,
    /// The largest value (exact).
    pub max: u64,
}

impl Default for Held {
    fn default() -> Self {
        Self::new()
    }
}

fn histogram() -> Histogram<u32> {
    // `new` fails only for more than 5 significant figures; auto-resizing, it takes any value.
    Histogram::new(SIGFIG).expect("1 significant figure is within 0..=5")
}

impl Held {
    /// No blocks.
    pub fn new() -> Self {
        Self {
            ages_ms: histogram(),
            sizes: histogram(),
            min_age_ms: u64::MAX,
            max_age_ms: 0,
            min_size: u64::MAX,
            max_size: 0,
        }
    }

    /// Counts one block of `size` bytes, `age_ms` old.
    pub fn record(&mut self, age_ms: u32, size: u64) {
        record(&mut self.ages_ms, u64::from(age_ms));
        record(&mut self.sizes, size);
        self.min_age_ms = self.min_age_ms.min(u64::from(age_ms));
        self.max_age_ms = self.max_age_ms.max(u64::from(age_ms));
        self.min_size = self.min_size.min(size);
        self.max_size = self.max_size.max(size);
    }

    /// Adds another stack's blocks (rows of one stack in several processes merging).
    pub fn add(&mut self, other: &Held) {
        // Auto-resizing histograms of the same precision always add; a failure would leave
        // this one as it was, which is still a true (partial) picture.
        let _ = self.ages_ms.add(&other.ages_ms);
        let _ = self.sizes.add(&other.sizes);
        self.min_age_ms = self.min_age_ms.min(other.min_age_ms);
        self.max_age_ms = self.max_age_ms.max(other.max_age_ms);
        self.min_size = self.min_size.min(other.min_size);
        self.max_size = self.max_size.max(other.max_size);
    }

    /// Blocks counted.
    pub fn blocks(&self) -> u64 {
        self.ages_ms.len()
    }

    /// Ages, in milliseconds.
    pub fn age_ms(&self) -> Quantiles {
        quantiles(&self.ages_ms, self.min_age_ms, self.max_age_ms)
    }

    /// Sizes, in bytes.
    pub fn size(&self) -> Quantiles {
        quantiles(&self.sizes, self.min_size, self.max_size)
    }

    /// Blocks per age band, in bands that double (`≤ 1 ms`, `≤ 2 ms`, `≤ 4 ms`, …), up to the
    /// band of the oldest: `(upper bound in ms, blocks)`, empty bands included so a chart of
    /// them has no gaps.
    pub fn age_bands_ms(&self) -> Vec<(u64, u64)> {
        if self.ages_ms.is_empty() {
            return Vec::new();
        }
        let max = self.max_age_ms;
        let mut bands = Vec::new();
        let mut upper = 1u64;
        let mut below = 0u64;
        loop {
            let upto = self.ages_ms.count_between(0, upper);
            bands.push((upper, upto - below));
            below = upto;
            if upper >= max || upper >= 1 << 40 {
                break;
            }
            upper *= 2;
        }
        bands
    }
}

/// Records `v`, growing the histogram to fit it; a value too large to grow to (near
/// `u64::MAX`) counts as the largest it can hold.
fn record(h: &mut Histogram<u32>, v: u64) {
    if h.record(v).is_err() {
        h.saturating_record(v);
    }
}

fn quantiles(h: &Histogram<u32>, min: u64, max: u64) -> Quantiles {
    if h.is_empty() {
        return Quantiles::default();
    }
    let at = |q: f64| h.lowest_equivalent(h.value_at_quantile(q)).clamp(min, max);
    Quantiles {
        p50: at(0.5),
        p90: at(0.9),
        max,
    }
}

impl PartialEq for Held {
    fn eq(&self, other: &Self) -> bool {
        self.ages_ms == other.ages_ms
            && self.sizes == other.sizes
            && (self.min_age_ms, self.max_age_ms) == (other.min_age_ms, other.max_age_ms)
            && (self.min_size, self.max_size) == (other.min_size, other.max_size)
    }
}

impl Eq for Held {}

/// Written as what a report shows: `{"blocks", "age_s": {"p50", "p90", "max"}, "size_bytes":
/// {"p50", "p90", "max"}, "age_bands": [[upper_s, blocks], …]}`.
impl Serialize for Held {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let secs = |ms: u64| ms as f64 / 1e3;
        let age = self.age_ms();
        let mut st = s.serialize_struct("Held", 4)?;
        st.serialize_field("blocks", &self.blocks())?;
        st.serialize_field(
            "age_s",
            &Q {
                p50: secs(age.p50),
                p90: secs(age.p90),
                max: secs(age.max),
            },
        )?;
        let size = self.size();
        st.serialize_field(
            "size_bytes",
            &Q {
                p50: size.p50,
                p90: size.p90,
                max: size.max,
            },
        )?;
        let bands: Vec<(f64, u64)> = self
            .age_bands_ms()
            .into_iter()
            .map(|(upper, n)| (secs(upper), n))
            .collect();
        st.serialize_field("age_bands", &bands)?;
        st.end()
    }
}

#[derive(serde::Serialize)]
struct Q<T> {
    p50: T,
    p90: T,
    max: T,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_uniform_ages_are_within_the_precision() {
        let mut h = Held::new();
        for age in 0..1000 {
            h.record(age, 64);
        }
        assert_eq!(h.blocks(), 1000);
        let a = h.age_ms();
        assert!((470..=530).contains(&a.p50), "{a:?}");
        assert!((850..=960).contains(&a.p90), "{a:?}");
        assert_eq!(a.max, 999);
        // Blocks of nearly one age: the quantiles are within the youngest and the oldest.
        let mut close = Held::new();
        close.record(3166, 24);
        close.record(3167, 24);
        assert_eq!(
            close.age_ms(),
            Quantiles {
                p50: 3166,
                p90: 3166,
                max: 3167
            }
        );
        assert_eq!(
            h.size(),
            Quantiles {
                p50: 64,
                p90: 64,
                max: 64
            }
        );
    }

    #[test]
    fn merged_holds_count_both() {
        let (mut a, mut b) = (Held::new(), Held::new());
        a.record(10, 8);
        b.record(5000, 1 << 20);
        a.add(&b);
        assert_eq!(a.blocks(), 2);
        assert_eq!((a.age_ms().max, a.size().max), (5000, 1 << 20));
        assert_eq!(a.age_ms().p50, 10);
    }

    #[test]
    fn age_bands_cover_every_block_once() {
        let mut h = Held::new();
        assert!(h.age_bands_ms().is_empty());
        for age in [0, 1, 3, 3, 100, 4000] {
            h.record(age, 1);
        }
        let bands = h.age_bands_ms();
        assert_eq!(bands.iter().map(|b| b.1).sum::<u64>(), 6);
        assert_eq!(bands[0], (1, 2));
        assert_eq!(bands[1], (2, 0));
        assert_eq!(bands[2], (4, 2));
        assert_eq!(bands.last().unwrap().0, 4096);
        assert_eq!(h.age_ms().p50, 3);
    }

    #[test]
    fn empty_and_huge_values_do_not_panic() {
        let mut h = Held::new();
        assert_eq!(h.age_ms(), Quantiles::default());
        h.record(u32::MAX, u64::MAX);
        assert_eq!(h.blocks(), 1);
        let _ = serde_json::to_string(&h).unwrap();
    }
}
