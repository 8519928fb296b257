-- Which clients follow which model: what client selection draws a round's cohort from,
-- shared by the instances. A live Subscribe stream's row has until_ms = the largest bigint and
-- names the instance holding it: it counts while that instance's `instances` row is alive
-- (one heartbeat per instance, nothing per client while streams last). When the stream ends,
-- until_ms becomes the end of `available_window_secs`.
CREATE TABLE presence (
    model text COLLATE "C" NOT NULL,
    client_id text COLLATE "C" NOT NULL,
    instance text NOT NULL,
    until_ms bigint NOT NULL,
    PRIMARY KEY (model, client_id)
);

CREATE TABLE instances (
    name text PRIMARY KEY,
    alive_until_ms bigint NOT NULL
);
