-- Hearth coordinator schema, version 1. Records are the same serde JSON the sled backend
-- keeps (jsonb); the columns beside them are what is looked up, ordered or constrained.
-- Text keys use the "C" collation so that orders match sled's byte order.

CREATE TABLE tokens (
    token text COLLATE "C" PRIMARY KEY,
    rec jsonb NOT NULL
);

CREATE TABLE clients (
    client_id text COLLATE "C" PRIMARY KEY,
    device_name text NOT NULL,
    rec jsonb NOT NULL
);
CREATE INDEX clients_device ON clients (device_name);

CREATE TABLE versions (
    model text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    meta jsonb NOT NULL,
    onnx bytea NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE TABLE server_state (
    model text COLLATE "C" PRIMARY KEY,
    state bytea NOT NULL
);

CREATE TABLE downlink (
    model text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    bytes bigint NOT NULL,
    PRIMARY KEY (model, version)
);

CREATE SEQUENCE round_ids;

CREATE TABLE rounds (
    id bigint PRIMARY KEY,
    model text COLLATE "C" NOT NULL,
    state text NOT NULL,
    rec jsonb NOT NULL
);
CREATE INDEX rounds_model ON rounds (model, id);
-- One open round per model, whichever instance opens it.
CREATE UNIQUE INDEX rounds_one_open ON rounds (model) WHERE state = 'open';

-- One row per accepted update: the primary key is what counts each (round, client) once.
CREATE TABLE markers (
    round bigint NOT NULL REFERENCES rounds (id),
    client_id text COLLATE "C" NOT NULL,
    instance text NOT NULL,
    marker jsonb NOT NULL,
    -- The decoded update, kept for the robust methods until the round closes.
    kept bytea,
    PRIMARY KEY (round, client_id)
);

-- Each instance's running weighted sum of the updates it accepted in an open round, with its
-- counters; combined and deleted by the instance that closes the round.
CREATE TABLE partial_sums (
    round bigint NOT NULL REFERENCES rounds (id),
    instance text NOT NULL,
    sum bytea NOT NULL,
    updates bigint NOT NULL,
    total_samples bigint NOT NULL,
    uplink_bytes bigint NOT NULL,
    eval_samples bigint NOT NULL,
    eval_loss_sum double precision NOT NULL,
    eval_correct double precision NOT NULL,
    PRIMARY KEY (round, instance)
);
