-- The compressed downlink: each version's coded delta against its parent, with the server's
-- error-feedback residual it left (coordinator/src/store.rs `DeltaRecord`).
CREATE TABLE deltas (
    model text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    base bigint NOT NULL,
    payload bytea NOT NULL,
    residual bytea NOT NULL,
    PRIMARY KEY (model, version)
);
