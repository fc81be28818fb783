//! Poisoned updates, to test and to show the coordinator's defences (`fl-client run --attack`, `fl-sim --attack`).
//! A test tool: a client that runs one sends a corrupted delta on purpose.

use crate::TensorSet;
use rand::Rng;
use rand_distr::{Distribution, Normal};

/// How an attacking client corrupts its update (the delta, local minus global).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Attack {
    /// `sign-flip:SCALE`: sends −SCALE × the honest delta.
    SignFlip(f32),
    /// `scale:FACTOR`: sends FACTOR × the honest delta.
    Scale(f32),
    /// `noise:STD`: adds Gaussian noise of standard deviation STD to every coordinate.
    Noise(f32),
}

/// Why an `--attack` value does not parse.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("--attack {given}: {why}; expected sign-flip:SCALE, scale:FACTOR or noise:STD (e.g. sign-flip:5)")]
pub struct AttackParseError {
    given: String,
    why: &'static str,
}

impl std::str::FromStr for Attack {
    type Err = AttackParseError;

    fn from_str(s: &str) -> Result<Attack, AttackParseError> {
        let err = |why| AttackParseError { given: s.to_string(), why };
        let (kind, value) = s.split_once(':').ok_or_else(|| err("missing ':VALUE'"))?;
        let value: f32 = value.parse().map_err(|_| err("the value is not a number"))?;
        if !value.is_finite() {
            return Err(err("the value must be finite"));
        }
        match kind {
            "sign-flip" if value > 0.0 => Ok(Attack::SignFlip(value)),
            "scale" => Ok(Attack::Scale(value)),
            "noise" if value > 0.0 => Ok(Attack::Noise(value)),
            "sign-flip" | "noise" => Err(err("the value must be more than 0")),
            _ => Err(err("unknown attack")),
        }
    }
}

impl std::fmt::Display for Attack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Attack::SignFlip(s) => write!(f, "sign-flip:{s}"),
            Attack::Scale(s) => write!(f, "scale:{s}"),
            Attack::Noise(s) => write!(f, "noise:{s}"),
        }
    }
}

impl Attack {
    /// Corrupts `delta` in place.
    pub fn apply(&self, delta: &mut TensorSet, rng: &mut impl Rng) {
        let scale = match *self {
            Attack::SignFlip(s) => -s,
            Attack::Scale(s) => s,
            Attack::Noise(std) => {
                let normal = Normal::new(0.0, std).expect("std checked positive and finite");
                for t in &mut delta.tensors {
                    for x in &mut t.data {
                        *x += normal.sample(rng);
                    }
                }
                return;
            }
        };
        for t in &mut delta.tensors {
            for x in &mut t.data {
                *x *= scale;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::NamedTensor;
    use rand::SeedableRng;

    fn delta() -> TensorSet {
        TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![3], data: vec![1.0, -2.0, 0.5] }])
    }

    #[test]
    fn attacks_parse_and_corrupt_the_delta() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let mut d = delta();
        "sign-flip:5".parse::<Attack>().unwrap().apply(&mut d, &mut rng);
        assert_eq!(d.tensors[0].data, vec![-5.0, 10.0, -2.5]);
        let mut d = delta();
        "scale:3".parse::<Attack>().unwrap().apply(&mut d, &mut rng);
        assert_eq!(d.tensors[0].data, vec![3.0, -6.0, 1.5]);
        let mut d =
            TensorSet::new(vec![NamedTensor { name: "w".into(), shape: vec![20_000], data: vec![0.0; 20_000] }]);
        "noise:2".parse::<Attack>().unwrap().apply(&mut d, &mut rng);
        let std = (d.tensors[0].data.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>() / 20_000.0).sqrt();
        assert!((std - 2.0).abs() < 0.05, "noise std {std}");
        assert_eq!("noise:2".parse::<Attack>().unwrap().to_string(), "noise:2");
    }

    #[test]
    fn bad_values_say_what_is_expected() {
        for bad in ["sign-flip", "sign-flip:-1", "flip:2", "noise:x", "scale:inf"] {
            let err = bad.parse::<Attack>().unwrap_err().to_string();
            assert!(err.starts_with(&format!("--attack {bad}:")) && err.contains("sign-flip:SCALE"), "{err}");
        }
    }
}
