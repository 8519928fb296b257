//! Whether the sun is up at a place and time: the solar elevation from the low-precision
//! formulas of the Astronomical Almanac (good to about 0.01°, far better than a rule needs).

/// Degrees of solar elevation at `unix_ms` seen from latitude `lat`, longitude `lon` (east
/// positive), in degrees.
pub fn elevation(lat: f64, lon: f64, unix_ms: u64) -> f64 {
    let d = unix_ms as f64 / 86_400_000.0 - 10_957.5; // days since J2000.0
    let rad = f64::to_radians;
    let g = rad((357.529 + 0.985_600_28 * d).rem_euclid(360.0));
    let q = (280.459 + 0.985_647_36 * d).rem_euclid(360.0);
    let l = rad(q + 1.915 * g.sin() + 0.020 * (2.0 * g).sin());
    let e = rad(23.439 - 0.000_000_36 * d);
    let ra = (e.cos() * l.sin()).atan2(l.cos());
    let dec = (e.sin() * l.sin()).asin();
    let gmst_h = (18.697_374_558 + 24.065_709_824_419_08 * d).rem_euclid(24.0);
    let ha = rad(gmst_h * 15.0 + lon) - ra;
    let lat = rad(lat);
    (lat.sin() * dec.sin() + lat.cos() * dec.cos() * ha.cos())
        .asin()
        .to_degrees()
}

/// Whether the sun's upper limb is above the horizon (elevation above −0.833°, refraction
/// included), as sunrise and sunset tables count it.
pub fn is_up(lat: f64, lon: f64, unix_ms: u64) -> bool {
    elevation(lat, lon, unix_ms) > -0.833
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn noon_and_midnight_in_london_and_the_polar_night() {
        // 2026-06-21 12:00 UTC and 00:00 UTC at Greenwich.
        let noon = 1_782_043_200_000;
        assert!(
            (elevation(51.48, 0.0, noon) - 62.0).abs() < 0.5,
            "{}",
            elevation(51.48, 0.0, noon)
        );
        assert!(is_up(51.48, 0.0, noon));
        assert!(!is_up(51.48, 0.0, noon - 12 * 3_600_000));
        // Tromsø at 11:00 UTC (about solar noon) on 2026-12-21: polar night.
        assert!(!is_up(69.65, 18.96, 1_797_850_800_000));
    }
}
