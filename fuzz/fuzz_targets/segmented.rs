//! The property the stream readers share (`sni`, `proxy_header`): the proxy appends each
//! read to one buffer and parses the whole buffer again, stopping at the first verdict
//! that is not "incomplete". That first verdict must not depend on the TCP segmentation:
//! it is the whole input's (or the whole input is still incomplete too). The split
//! points come from a hash of the input, so every mutation also tries other
//! segmentations, and a crash replays from its input alone.

use std::fmt::Debug;

/// Reads per input at most; each re-parses the buffer so far, as the proxy does.
const MAX_READS: usize = 16;

/// Feeds `data` to `parse` in up to [`MAX_READS`] growing prefixes and checks the first
/// verdict other than `incomplete` against `parse(data)`.
pub fn check<T: PartialEq + Debug>(data: &[u8], incomplete: &T, parse: impl Fn(&[u8]) -> T) {
    let whole = parse(data);
    let mut rng = SplitMix64(fnv1a(data));
    let mut end = 0;
    for read in 1..=MAX_READS {
        if end == data.len() {
            break;
        }
        let rest = data.len() - end;
        end += if read == MAX_READS {
            rest
        } else {
            1 + (rng.next() % rest as u64) as usize
        };
        let verdict = parse(&data[..end]);
        if verdict != *incomplete {
            assert_eq!(
                verdict,
                whole,
                "verdict after {end} of {} bytes differs from the whole input's",
                data.len()
            );
            return;
        }
    }
    // Every read was incomplete, the last one being the whole input.
}

fn fnv1a(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A tiny deterministic generator (splitmix64).
struct SplitMix64(u64);

impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}
