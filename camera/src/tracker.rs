//! Object tracks and Frigate's event life cycle: `new` → rate-limited `update`s → `end`.
//!
//! After every detector run, detections are associated with the live tracks greedily by
//! IoU (best pairs first, at least `match_iou`). A track is confirmed — and its `new` event
//! sent — after `min_hits` matched runs, so one spurious detection makes no event. A
//! confirmed track sends `update` only when something changed (top score, score by
//! `update_score_delta`, or its box moved: IoU with the last sent box below
//! `update_box_iou`) *and* `update_interval_secs` passed since its last event. It ends —
//! one `end` — after `max_misses` runs without a match spanning at least `lost_after_secs`.
//! A person standing still therefore gives one track, one `new`, few `update`s, one `end`.
//! At most `max_tracks` tracks live at once (bounded memory; extra detections are counted).

use hearth_proto::mqtt::{CameraEvent, TrackPhase};

use crate::detector::{iou, Detection};

/// Tracker settings.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackerOptions {
    /// Camera (device) name written into every event.
    pub camera: String,
    /// Object label, e.g. `face`.
    pub label: String,
    /// Model tag, `name@version`.
    pub model: String,
    pub match_iou: f32,
    pub min_hits: u32,
    pub update_interval_secs: f64,
    pub update_score_delta: f32,
    pub update_box_iou: f32,
    pub max_misses: u32,
    pub lost_after_secs: f64,
    pub max_tracks: usize,
}

impl Default for TrackerOptions {
    fn default() -> Self {
        TrackerOptions {
            camera: "camera".into(),
            label: "face".into(),
            model: "blazeface@1".into(),
            match_iou: 0.3,
            min_hits: 2,
            update_interval_secs: 5.0,
            update_score_delta: 0.1,
            update_box_iou: 0.7,
            max_misses: 3,
            lost_after_secs: 2.0,
            max_tracks: 16,
        }
    }
}

#[derive(Debug, Clone)]
struct Track {
    id: String,
    start_time: f64,
    last_seen: f64,
    hits: u32,
    misses: u32,
    score: f32,
    top_score: f32,
    bbox: [f32; 4],
    confirmed: bool,
    /// Time, box and top score of the last event sent.
    sent_at: f64,
    sent_box: [f32; 4],
    sent_score: f32,
    sent_top: f32,
}

/// The tracks of one camera.
#[derive(Debug)]
pub struct Tracker {
    opts: TrackerOptions,
    tracks: Vec<Track>,
    next: u64,
    /// Detections not tracked because `max_tracks` tracks were live.
    pub overflow: u64,
}

impl Tracker {
    pub fn new(opts: TrackerOptions) -> Tracker {
        Tracker {
            opts,
            tracks: Vec::new(),
            next: 0,
            overflow: 0,
        }
    }

    /// Live tracks (confirmed or not).
    pub fn active(&self) -> usize {
        self.tracks.len()
    }

    /// Whether any confirmed track is live.
    pub fn has_confirmed(&self) -> bool {
        self.tracks.iter().any(|t| t.confirmed)
    }

    fn event(&self, t: &Track, phase: TrackPhase, end_time: Option<f64>) -> CameraEvent {
        // Milliseconds are enough, and keep the payload short.
        let ms = |v: f64| (v * 1000.0).round() / 1000.0;
        CameraEvent {
            phase,
            id: t.id.clone(),
            camera: self.opts.camera.clone(),
            label: self.opts.label.clone(),
            score: t.score.min(t.top_score),
            top_score: t.top_score,
            bbox: t.bbox.map(|v| v.clamp(0.0, 1.0)),
            start_time: ms(t.start_time),
            end_time: end_time.map(ms),
            model: self.opts.model.clone(),
            sub_label: None,
            sub_score: None,
        }
    }

    /// Folds one detector run at Unix time `now` into the tracks; events go to `out`.
    pub fn observe(&mut self, now: f64, dets: &[Detection], out: &mut Vec<CameraEvent>) {
        // Greedy IoU association, best pairs first.
        let mut pairs: Vec<(f32, usize, usize)> = Vec::new();
        for (ti, t) in self.tracks.iter().enumerate() {
            for (di, d) in dets.iter().enumerate() {
                let v = iou(&t.bbox, &d.bbox);
                if v >= self.opts.match_iou {
                    pairs.push((v, ti, di));
                }
            }
        }
        pairs.sort_by(|a, b| b.0.total_cmp(&a.0));
        let mut track_hit = vec![false; self.tracks.len()];
        let mut det_used = vec![false; dets.len()];
        for (_, ti, di) in pairs {
            if track_hit[ti] || det_used[di] {
                continue;
            }
            track_hit[ti] = true;
            det_used[di] = true;
            let d = dets[di];
            let t = &mut self.tracks[ti];
            t.bbox = d.bbox;
            t.score = d.score;
            t.top_score = t.top_score.max(d.score);
            t.hits += 1;
            t.misses = 0;
            t.last_seen = now;
        }
        // Events of matched tracks.
        for (ti, _) in track_hit.iter().enumerate().filter(|(_, hit)| **hit) {
            let t = &self.tracks[ti];
            let phase = if !t.confirmed {
                (t.hits >= self.opts.min_hits).then_some(TrackPhase::New)
            } else {
                let changed = t.top_score > t.sent_top
                    || (t.score - t.sent_score).abs() >= self.opts.update_score_delta
                    || iou(&t.bbox, &t.sent_box) < self.opts.update_box_iou;
                (changed && now - t.sent_at >= self.opts.update_interval_secs)
                    .then_some(TrackPhase::Update)
            };
            if let Some(phase) = phase {
                out.push(self.event(t, phase, None));
                let t = &mut self.tracks[ti];
                t.confirmed = true;
                t.sent_at = now;
                t.sent_box = t.bbox;
                t.sent_score = t.score;
                t.sent_top = t.top_score;
            }
        }
        // Misses; tracks lost long enough end.
        let mut ti = 0;
        let mut hit_iter = track_hit.into_iter();
        while ti < self.tracks.len() {
            let hit = hit_iter.next().unwrap_or(true);
            if !hit {
                let t = &mut self.tracks[ti];
                t.misses += 1;
                if t.misses >= self.opts.max_misses
                    && now - t.last_seen >= self.opts.lost_after_secs
                {
                    let t = self.tracks.remove(ti);
                    if t.confirmed {
                        out.push(self.event(&t, TrackPhase::End, Some(t.last_seen)));
                    }
                    continue;
                }
            }
            ti += 1;
        }
        // New tracks for unmatched detections.
        for (di, d) in dets.iter().enumerate() {
            if det_used[di] {
                continue;
            }
            if self.tracks.len() >= self.opts.max_tracks {
                self.overflow += 1;
                continue;
            }
            self.next += 1;
            let t = Track {
                // Unix milliseconds and a counter: `[0-9-]` only, so a feedback can name it.
                id: format!("{}-{}", (now.max(0.0) * 1000.0).round() as u64, self.next),
                start_time: now,
                last_seen: now,
                hits: 1,
                misses: 0,
                score: d.score,
                top_score: d.score,
                bbox: d.bbox,
                confirmed: false,
                sent_at: now,
                sent_box: d.bbox,
                sent_score: d.score,
                sent_top: d.score,
            };
            if self.opts.min_hits <= 1 {
                out.push(self.event(&t, TrackPhase::New, None));
                self.tracks.push(Track {
                    confirmed: true,
                    ..t
                });
            } else {
                self.tracks.push(t);
            }
        }
    }

    /// Ends every live track (the stream went down, or the camera stops).
    pub fn end_all(&mut self, out: &mut Vec<CameraEvent>) {
        for t in std::mem::take(&mut self.tracks) {
            if t.confirmed {
                out.push(self.event(&t, TrackPhase::End, Some(t.last_seen)));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn det(x: f32, score: f32) -> Detection {
        Detection {
            bbox: [x, 0.2, x + 0.3, 0.6],
            score,
        }
    }

    fn phases(ev: &[CameraEvent]) -> Vec<TrackPhase> {
        ev.iter().map(|e| e.phase).collect()
    }

    #[test]
    fn standing_still_is_one_track_one_new_one_end() {
        let mut tr = Tracker::new(TrackerOptions::default());
        let mut ev = Vec::new();
        // 60 s at 5 runs/s of a face that jitters a little.
        for i in 0..300 {
            let jitter = (i % 3) as f32 * 0.004;
            tr.observe(
                1000.0 + i as f64 * 0.2,
                &[det(0.3 + jitter, 0.9 - jitter)],
                &mut ev,
            );
        }
        for i in 0..20 {
            tr.observe(1060.0 + i as f64 * 0.2, &[], &mut ev);
        }
        assert_eq!(phases(&ev), [TrackPhase::New, TrackPhase::End]);
        assert_eq!(ev[0].id, ev[1].id);
        assert!(ev.iter().all(|e| e.validate().is_ok()));
        // Track ids are event ids a feedback can name.
        assert!(hearth_proto::mqtt::valid_name(&ev[0].id), "{}", ev[0].id);
        assert!((ev[1].end_time.unwrap() - 1059.8).abs() < 1e-6);
    }

    #[test]
    fn updates_are_rate_limited() {
        let mut tr = Tracker::new(TrackerOptions::default());
        let mut ev = Vec::new();
        // A face walking across the frame: its box changes on every run for 20 s.
        for i in 0..100 {
            let x = 0.05 + 0.006 * i as f32;
            tr.observe(i as f64 * 0.2, &[det(x, 0.8)], &mut ev);
        }
        let updates = ev.iter().filter(|e| e.phase == TrackPhase::Update).count();
        assert_eq!(phases(&ev)[0], TrackPhase::New);
        // 20 s at one update per 5 s at most.
        assert!((1..=4).contains(&updates), "{updates} updates");
        let ids: std::collections::HashSet<_> = ev.iter().map(|e| &e.id).collect();
        assert_eq!(ids.len(), 1);
    }

    #[test]
    fn a_single_flicker_makes_no_event_and_two_faces_two_tracks() {
        let mut tr = Tracker::new(TrackerOptions::default());
        let mut ev = Vec::new();
        tr.observe(0.0, &[det(0.1, 0.7)], &mut ev);
        for i in 1..20 {
            tr.observe(i as f64 * 0.2, &[], &mut ev);
        }
        assert!(ev.is_empty());
        assert_eq!(tr.active(), 0);
        for i in 0..5 {
            tr.observe(
                10.0 + i as f64 * 0.2,
                &[det(0.05, 0.9), det(0.6, 0.8)],
                &mut ev,
            );
        }
        assert_eq!(phases(&ev), [TrackPhase::New, TrackPhase::New]);
        assert_ne!(ev[0].id, ev[1].id);
        let mut end = Vec::new();
        tr.end_all(&mut end);
        assert_eq!(phases(&end), [TrackPhase::End, TrackPhase::End]);
    }

    #[test]
    fn tracks_are_bounded() {
        let mut tr = Tracker::new(TrackerOptions {
            max_tracks: 3,
            ..TrackerOptions::default()
        });
        let dets: Vec<_> = (0..8)
            .map(|i| Detection {
                bbox: [i as f32 * 0.12, 0.0, i as f32 * 0.12 + 0.1, 0.1],
                score: 0.9,
            })
            .collect();
        let mut ev = Vec::new();
        tr.observe(0.0, &dets, &mut ev);
        assert_eq!(tr.active(), 3);
        assert_eq!(tr.overflow, 5);
    }
}
