-- A configuration version names what it changed — a key, a pool, or the catalog — so the watch
-- can send proxies behind it that alone. A version with no row changed something else: a proxy
-- behind it gets everything.
ALTER TABLE config_changes RENAME COLUMN key_id TO item_id;
ALTER TABLE config_changes ADD COLUMN kind TEXT NOT NULL DEFAULT 'key';
