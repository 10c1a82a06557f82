-- What a configuration version changed when it changed keys alone, so the watch can send a
-- proxy those keys instead of the whole configuration. A version with no row here changed
-- something else (pools, catalog, accounts, settings): a proxy behind it gets everything.
CREATE TABLE config_changes (
    version BIGINT NOT NULL,
    key_id TEXT NOT NULL
);
CREATE INDEX config_changes_version ON config_changes (version);
