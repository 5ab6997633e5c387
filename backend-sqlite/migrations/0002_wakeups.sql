-- relayq schema version 2: a counter that tells other processes a job
-- they did not store became due.
--
-- New jobs show in the id sequence, which other processes' wake-up pollers
-- watch. A lease released, or a retry due at once, makes an existing job
-- due; the transaction doing so bumps `seq` so those pollers notice it too.

CREATE TABLE relayq_wakeups (
    id  INTEGER PRIMARY KEY CHECK (id = 1),
    seq INTEGER NOT NULL
) STRICT;

INSERT INTO relayq_wakeups (id, seq) VALUES (1, 0);
