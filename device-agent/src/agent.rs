//! The agent's life cycle: prepare (local data share, model), connect to MQTT,
//! replay samples through the classifier and publish verdicts, run the
//! federation client, and shut down cleanly (`offline` retained).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use hearth_edge::{stopped, Connection};
use hearth_model::{train, Dataset, MlpSpec, OnnxModel, Split, TaskSpec, TrainConfig};
use hearth_proto::mqtt::{
    availability_topic, event_topic, feedback_topic, meta_topic, DeviceMeta, Event, Feedback,
};
use rumqttc::{AsyncClient, Packet, QoS};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

use crate::inference::{Loaded, ModelSlot};
use crate::mqtt;
use crate::samples::{Labelled, SampleStore};
use crate::state::StateDir;
use crate::stats::{add, AgentStats};
use crate::{federation, Config, Error};

/// How long each part of the agent gets to stop at shutdown.
const STOP_LIMIT: Duration = Duration::from_secs(5);
/// How long the final `offline` publication and disconnect may take.
const OFFLINE_LIMIT: Duration = Duration::from_secs(3);

/// What the agent's tasks share.
pub(crate) struct Shared {
    pub config: Config,
    pub model_name: String,
    /// The device's own share of the train split (never leaves the device).
    pub data: Arc<Dataset>,
    pub slot: Arc<ModelSlot>,
    pub stats: Arc<AgentStats>,
    pub state: StateDir,
    pub mqtt: AsyncClient,
    /// The task file (preprocessing of live windows).
    pub task: TaskSpec,
    /// The samples behind recent events (`[store] enabled`).
    pub samples: Option<Arc<SampleStore>>,
    /// What the metrics endpoint renders besides the counters (the camera).
    pub metrics: Arc<crate::metrics::Metrics>,
    /// Held by a round's local training and by idle distillation: one CPU job at a time.
    pub cpu: tokio::sync::Mutex<()>,
}

/// What became of one verdict.
pub(crate) enum Published {
    /// Handed to the MQTT client.
    Sent,
    /// Below `min_event_score`, or inference failed (counted).
    Skipped,
    /// Stopping, or the MQTT client is gone.
    Closed,
}

impl Shared {
    /// Publishes the retained device description for the model now in use.
    pub(crate) async fn publish_meta(&self) -> Result<(), Error> {
        let cur = self.slot.current();
        let meta = DeviceMeta {
            device: self.config.device.clone(),
            kind: "agent".into(),
            model: cur.tag(),
            classes: cur.classes().to_vec(),
            events: vec![self.config.event_name()],
            sw_version: env!("CARGO_PKG_VERSION").into(),
        };
        let body = serde_json::to_vec(&meta).expect("meta serialises");
        self.mqtt
            .publish(
                meta_topic(&self.config.device),
                QoS::AtLeastOnce,
                true,
                body,
            )
            .await?;
        Ok(())
    }

    async fn announce(&self) -> Result<(), Error> {
        self.mqtt
            .publish(
                availability_topic(&self.config.device),
                QoS::AtLeastOnce,
                true,
                "online",
            )
            .await?;
        self.publish_meta().await
    }

    /// Classifies one preprocessed sample off the runtime and publishes the verdict — an
    /// [`Event`], checked as the hub checks it — on the device's event topic. The only path
    /// from a sample to MQTT: the sample itself is never published.
    pub(crate) async fn publish_verdict(
        &self,
        input: Vec<f32>,
        stop: &mut watch::Receiver<bool>,
    ) -> Published {
        let cfg = &self.config;
        let model = self.slot.current();
        let store = self.samples.clone();
        let min_score = cfg.min_event_score;
        let id = format!("{:016x}", rand::random::<u64>());
        // Inference, and keeping the sample behind a published verdict, off the runtime.
        let verdict = tokio::task::spawn_blocking(move || {
            let mut ev = model.verdict(&input, SystemTime::now())?;
            if ev.score < min_score {
                return Ok::<_, Error>((ev, false));
            }
            ev.id = Some(id);
            let mut kept = false;
            if let (Some(store), Some(id)) = (store, &ev.id) {
                let class = model.classes().iter().position(|c| *c == ev.class);
                match store.insert(id, &input, class.unwrap_or(0) as u16) {
                    Ok(()) => kept = true,
                    Err(e) => tracing::warn!("sample not kept: {e}"),
                }
            }
            Ok((ev, kept))
        })
        .await;
        let ev = match verdict {
            Ok(Ok((ev, kept))) => {
                if kept {
                    add(&self.stats.samples_stored, 1);
                }
                ev
            }
            Ok(Err(e)) => {
                add(&self.stats.inference_errors, 1);
                tracing::warn!("inference failed: {e}");
                return Published::Skipped;
            }
            Err(e) => {
                add(&self.stats.inference_errors, 1);
                tracing::warn!("inference task failed: {e}");
                return Published::Skipped;
            }
        };
        if ev.score < cfg.min_event_score {
            add(&self.stats.events_suppressed, 1);
            return Published::Skipped;
        }
        let payload = ev.to_json();
        // The same check the hub applies: size, schema and field contents.
        if let Err(e) = Event::parse(&payload) {
            add(&self.stats.inference_errors, 1);
            tracing::warn!("refusing to publish an invalid event: {e}");
            return Published::Skipped;
        }
        let topic = event_topic(&cfg.device, &cfg.event_name());
        tokio::select! {
            _ = stopped(stop) => Published::Closed,
            r = self.mqtt.publish(topic, QoS::AtLeastOnce, false, payload) => match r {
                Ok(()) => {
                    add(&self.stats.events_published, 1);
                    Published::Sent
                }
                Err(e) => {
                    tracing::warn!("MQTT client closed: {e}");
                    Published::Closed
                }
            }
        }
    }

    /// The device's training set: its own share plus every sample the home labelled
    /// through feedback (disk work: call off the async runtime).
    pub(crate) fn training_data(&self) -> Arc<Dataset> {
        let Some(store) = &self.samples else {
            return self.data.clone();
        };
        let labelled = match store.labelled() {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!("labelled samples not read: {e}");
                return self.data.clone();
            }
        };
        let mut d = (*self.data).clone();
        let mut n = 0;
        for s in labelled {
            match s.label {
                Some(l) if s.input.len() == d.input_len && usize::from(l) < d.classes.len() => {
                    d.x.extend_from_slice(&s.input);
                    d.y.push(u32::from(l));
                    n += 1;
                }
                _ => {}
            }
        }
        if n > 0 {
            tracing::info!(
                labelled = n,
                own = self.data.len(),
                "training with the home's labels"
            );
        }
        Arc::new(d)
    }

    /// Applies a feedback message (`hearth/<device>/feedback`): labels the stored sample
    /// behind the event it names. Counted either way; never publishes anything.
    async fn feedback(&self, payload: Vec<u8>) {
        let refuse = |why: String| {
            add(&self.stats.feedback_refused, 1);
            tracing::warn!("feedback refused: {why}");
        };
        let f = match Feedback::parse(&payload) {
            Ok(f) => f,
            Err(e) => return refuse(e.to_string()),
        };
        let Some(class) = self
            .slot
            .current()
            .classes()
            .iter()
            .position(|c| *c == f.label)
        else {
            return refuse(format!("{:?} is not one of the model's classes", f.label));
        };
        let Some(store) = self.samples.clone() else {
            return refuse("the sample store is disabled ([store] enabled = false)".into());
        };
        let event = f.event.clone();
        let r = tokio::task::spawn_blocking(move || store.label(&event, class as u16)).await;
        match r {
            Ok(Ok(Labelled::Applied)) => {
                add(&self.stats.feedback_applied, 1);
                tracing::debug!(event = %f.event, label = %f.label, "sample labelled");
            }
            Ok(Ok(Labelled::UnknownEvent)) => {
                refuse(format!("no stored sample behind event {}", f.event))
            }
            Ok(Err(e)) => refuse(e.to_string()),
            Err(e) => refuse(e.to_string()),
        }
    }

    /// Records `l` as the model in use.
    pub(crate) fn install(&self, l: Arc<Loaded>) {
        let version = l.version;
        let tag = l.tag();
        let engine = l.engine();
        let old = self.slot.swap(l);
        self.stats
            .model_version
            .store(version, std::sync::atomic::Ordering::Relaxed);
        add(&self.stats.models_loaded, 1);
        tracing::info!(from = %old.tag(), to = %tag, %engine, "model hot-swapped");
    }
}

/// A running agent.
pub struct AgentHandle {
    shared: Arc<Shared>,
    stop_tx: watch::Sender<bool>,
    replay: Option<JoinHandle<()>>,
    federation: Option<JoinHandle<()>>,
    distill: Option<JoinHandle<()>>,
    metrics: Option<JoinHandle<()>>,
    metrics_addr: Option<std::net::SocketAddr>,
    mqtt_stop: Option<oneshot::Sender<()>>,
    mqtt_task: Option<JoinHandle<()>>,
    replay_done: watch::Receiver<bool>,
}

impl std::fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentHandle")
            .field("device", &self.shared.config.device)
            .field("stats", &self.shared.stats.snapshot())
            .finish()
    }
}

impl AgentHandle {
    /// Live counters.
    pub fn stats(&self) -> Arc<AgentStats> {
        self.shared.stats.clone()
    }

    /// `name@version` of the model in use.
    pub fn model_tag(&self) -> String {
        self.shared.slot.current().tag()
    }

    /// Class labels of the model in use.
    pub fn classes(&self) -> Vec<String> {
        self.shared.slot.current().classes().to_vec()
    }

    /// Where the metrics endpoint listens (`metrics_listen`), once bound.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics_addr
    }

    /// Whether the model in use was distilled on the device (idle distillation).
    pub fn model_distilled(&self) -> bool {
        self.shared.slot.current().distilled
    }

    /// The weights of the model in use (by initializer name).
    pub fn model_weights(&self) -> hearth_model::Weights {
        self.shared.slot.current().onnx.weights()
    }

    /// Number of samples in this device's own share of the data.
    pub fn local_samples(&self) -> usize {
        self.shared.data.len()
    }

    /// Resolves when the replay has reached `replay_limit` (never without a limit,
    /// unless the agent is shutting down).
    pub async fn replay_finished(&self) {
        let mut rx = self.replay_done.clone();
        stopped(&mut rx).await
    }

    /// Stops replay and federation, publishes `offline` (retained) and
    /// disconnects, each step within a time limit.
    pub async fn shutdown(mut self) -> Result<(), Error> {
        let _ = self.stop_tx.send(true);
        let mut result = Ok(());
        for (what, task) in [
            ("replay", self.replay.take()),
            ("federation", self.federation.take()),
            ("distill", self.distill.take()),
            ("metrics", self.metrics.take()),
        ] {
            if let Some(t) = task {
                if let Err(e) = join_within(t, STOP_LIMIT, what).await {
                    result = Err(e);
                }
            }
        }
        if let Some(tx) = self.mqtt_stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.mqtt_task.take() {
            join_within(t, STOP_LIMIT + OFFLINE_LIMIT, "mqtt").await?;
        }
        tracing::info!(stats = ?self.shared.stats.snapshot(), "agent stopped");
        result
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        // A handle dropped without shutdown(): stop the tasks rather than leak them.
        let _ = self.stop_tx.send(true);
        for t in [
            self.replay.take(),
            self.federation.take(),
            self.distill.take(),
            self.metrics.take(),
            self.mqtt_task.take(),
        ]
        .into_iter()
        .flatten()
        {
            t.abort();
        }
    }
}

async fn join_within(mut t: JoinHandle<()>, limit: Duration, what: &str) -> Result<(), Error> {
    match tokio::time::timeout(limit, &mut t).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) if e.is_cancelled() => Ok(()),
        Ok(Err(e)) => Err(Error::Task(format!("{what}: {e}"))),
        Err(_) => {
            t.abort();
            Err(Error::Task(format!("{what} did not stop within {limit:?}")))
        }
    }
}

/// Loads the device's data share and the model to start from (CPU and disk work).
type Prepared = (
    Dataset,
    Loaded,
    StateDir,
    TaskSpec,
    Option<Arc<SampleStore>>,
);

fn prepare(config: &Config) -> Result<Prepared, Error> {
    let state = StateDir::open(&config.state_dir)?;
    let samples = if config.store.enabled {
        Some(Arc::new(SampleStore::open(
            &config.state_dir,
            config.store.clone(),
        )?))
    } else {
        None
    };
    let task = config.task_spec()?;
    let full = task
        .load(Split::Train)
        .map_err(hearth_model::ModelError::from)?;
    let p = &config.partition;
    let data = full.partition(p.index, p.count, p.alpha, p.seed);
    if data.is_empty() {
        return Err(Error::Config(format!(
            "partition {}/{} of {} is empty",
            p.index, p.count, task.name
        )));
    }
    let name = config.model_name();

    match state.load_model(&name) {
        Ok(Some((meta, bytes))) => {
            match Loaded::from_bytes(&name, meta.version, true, &bytes).and_then(|mut l| {
                l.check_compatible(&data)?;
                l.adopt(&task)?;
                Ok(l)
            }) {
                Ok(l) => {
                    tracing::info!(model = %l.tag(), engine = %l.engine(), "loaded the stored global model");
                    return Ok((data, l, state, task, samples));
                }
                Err(e) => tracing::warn!("ignoring the stored model: {e}"),
            }
        }
        Ok(None) => {}
        Err(e) => tracing::warn!("ignoring the stored model: {e}"),
    }

    if let Some(path) = &config.initial_model {
        let mut l = Loaded::new(&name, 0, false, OnnxModel::load(path)?)?;
        l.check_compatible(&data)?;
        l.adopt(&task)?;
        tracing::info!(path = %path.display(), engine = %l.engine(), "loaded the initial model");
        return Ok((data, l, state, task, samples));
    }

    // Bootstrap: the shipped architecture, trained on this device's own samples.
    let spec = MlpSpec {
        task: task.name.clone(),
        input_len: data.input_len,
        hidden: task.mlp_spec().hidden,
        classes: data.classes.clone(),
    };
    let mut onnx = OnnxModel::build_mlp(&spec, p.seed);
    task.stamp(&mut onnx)
        .map_err(hearth_model::ModelError::from)?;
    if config.bootstrap_epochs > 0 {
        let cfg = TrainConfig {
            epochs: config.bootstrap_epochs,
            seed: p.seed ^ p.index as u64,
            weight_decay: task.weight_decay(),
            ..TrainConfig::default()
        };
        let (w, report) = train(&onnx, &data, &cfg)?;
        onnx.set_weights(&w)?;
        tracing::info!(
            samples = report.samples,
            loss = report.final_loss,
            "bootstrapped a local model on the device's own data"
        );
    }
    let mut l = Loaded::new(&name, 0, false, onnx)?;
    l.check_compatible(&data)?;
    l.adopt(&task)?;
    Ok((data, l, state, task, samples))
}

/// Starts an agent: validates the configuration, loads its data share and model,
/// connects to MQTT, and starts replay and (with a coordinator) federation.
pub async fn start(config: Config) -> Result<AgentHandle, Error> {
    config.validate()?;
    let cfg = config.clone();
    let (data, loaded, state, task, samples) =
        tokio::task::spawn_blocking(move || prepare(&cfg)).await??;
    let stats = Arc::new(AgentStats::default());
    stats
        .model_version
        .store(loaded.version, std::sync::atomic::Ordering::Relaxed);
    tracing::info!(
        device = %config.device,
        model = %loaded.tag(),
        local_samples = data.len(),
        "agent prepared"
    );

    // Bind before anything runs: a taken port is a start-up failure (exit 69).
    let metrics_listener = match &config.metrics_listen {
        Some(addr) => Some(
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| Error::Bind(format!("metrics_listen {addr}: {e}")))?,
        ),
        None => None,
    };
    let metrics_addr = metrics_listener.as_ref().and_then(|l| l.local_addr().ok());
    let device = config.device.clone();
    let (client, eventloop) = mqtt::settings(
        &config.mqtt,
        config.mqtt_ca_file.as_deref(),
        &format!("hearth-agent-{device}"),
        &availability_topic(&device),
    )?
    .password_file(config.mqtt_password_file.clone())
    .connect()?;
    let conn = Connection::new(eventloop, format!("agent {device}"));
    let shared = Arc::new(Shared {
        model_name: config.model_name(),
        config,
        data: Arc::new(data),
        slot: Arc::new(ModelSlot::new(loaded)),
        stats,
        state,
        mqtt: client,
        task,
        samples,
        metrics: Arc::default(),
        cpu: tokio::sync::Mutex::new(()),
    });
    if let Some(addr) = metrics_addr {
        tracing::info!(%addr, "metrics endpoint listening");
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let (mqtt_stop_tx, mqtt_stop_rx) = oneshot::channel();
    let mqtt_task = tokio::spawn(mqtt_loop(conn, shared.clone(), mqtt_stop_rx));
    let (done_tx, done_rx) = watch::channel(false);
    // A camera agent runs its camera instead of the replay (`crate::camera`).
    let replay = if shared.config.camera.is_some() {
        tokio::spawn(crate::camera::camera_loop(
            shared.clone(),
            stop_rx.clone(),
            done_tx,
        ))
    } else if shared.config.source.windowing().is_some() {
        tokio::spawn(crate::live::run(shared.clone(), stop_rx.clone(), done_tx))
    } else {
        tokio::spawn(replay_loop(shared.clone(), stop_rx.clone(), done_tx))
    };
    let federation = shared.config.coordinator_url().map(|url| {
        tokio::spawn(federation::run(
            shared.clone(),
            url.to_string(),
            stop_rx.clone(),
        ))
    });

    let distill = shared
        .config
        .distill
        .enabled
        .then(|| tokio::spawn(crate::distill::idle_loop(shared.clone(), stop_rx.clone())));
    let metrics = metrics_listener
        .map(|l| tokio::spawn(crate::metrics::serve(l, shared.clone(), stop_rx.clone())));

    Ok(AgentHandle {
        shared,
        stop_tx,
        replay: Some(replay),
        federation,
        distill,
        metrics,
        metrics_addr,
        mqtt_stop: Some(mqtt_stop_tx),
        mqtt_task: Some(mqtt_task),
        replay_done: done_rx,
    })
}

/// Runs an agent until `shutdown` resolves, then stops it cleanly.
pub async fn run(
    config: Config,
    shutdown: impl std::future::Future<Output = ()>,
) -> Result<(), Error> {
    let handle = start(config).await?;
    shutdown.await;
    handle.shutdown().await
}

/// Drives the MQTT connection (the edge reconnect loop); announces `online` + meta on
/// every (re)connect.
async fn mqtt_loop(mut conn: Connection, shared: Arc<Shared>, mut stop: oneshot::Receiver<()>) {
    let avail = availability_topic(&shared.config.device);
    let feedback = feedback_topic(&shared.config.device);
    while let Some(ev) = conn.poll_until(&mut stop).await {
        if let rumqttc::Event::Incoming(Packet::Publish(p)) = &ev {
            if p.topic == feedback {
                let s = shared.clone();
                let payload = p.payload.to_vec();
                tokio::spawn(async move { s.feedback(payload).await });
            }
            continue;
        }
        if let rumqttc::Event::Incoming(Packet::ConnAck(_)) = ev {
            // Feedback from the home (clean session: again after every reconnect).
            if let Err(e) = shared
                .mqtt
                .try_subscribe(feedback.clone(), QoS::AtLeastOnce)
            {
                tracing::warn!("cannot subscribe to {feedback}: {e}");
            }
            add(&shared.stats.mqtt_connects, 1);
            tracing::info!(broker = %hearth_edge::url::redact(&shared.config.mqtt), "MQTT connected");
            let s = shared.clone();
            // Publish from another task: the request queue is drained by this loop.
            tokio::spawn(async move {
                if let Err(e) = s.announce().await {
                    tracing::warn!("could not announce the device: {e}");
                }
            });
        }
    }
    conn.go_offline(&shared.mqtt, &avail, OFFLINE_LIMIT).await;
}

/// Replays the device's own samples as if sensed, classifies each off the
/// runtime and publishes the verdicts (never the samples).
async fn replay_loop(
    shared: Arc<Shared>,
    mut stop: watch::Receiver<bool>,
    done: watch::Sender<bool>,
) {
    let cfg = &shared.config;
    let n = shared.data.len();
    let mut ticker = (cfg.replay_rate_hz > 0.0).then(|| {
        let mut t = tokio::time::interval(Duration::from_secs_f64(1.0 / cfg.replay_rate_hz));
        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        t
    });
    let limit = cfg.replay_limit.unwrap_or(u64::MAX);
    let mut i: u64 = 0;
    while i < limit {
        if let Some(t) = ticker.as_mut() {
            tokio::select! {
                _ = stopped(&mut stop) => break,
                _ = t.tick() => {}
            }
        } else if *stop.borrow() {
            break;
        }
        let idx = (i % n as u64) as usize;
        i += 1;
        add(&shared.stats.samples_replayed, 1);
        let input = shared.data.sample(idx).to_vec();
        if let Published::Closed = shared.publish_verdict(input, &mut stop).await {
            break;
        }
    }
    tracing::info!(samples = i, "replay finished");
    let _ = done.send(true);
}
