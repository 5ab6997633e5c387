-- Refills the baseline table with :rows pending jobs (psql -v rows=N).
SET search_path = relayq_baseline;
TRUNCATE jobs RESTART IDENTITY;
INSERT INTO jobs (kind, payload)
SELECT 'send_email',
       jsonb_build_object('type', 'send_email', 'seq', g, 'enq_us', g,
                          'to', 'user@example.com', 'pad', 'xxxxxxxxx')
FROM generate_series(0, :rows - 1) AS g;
VACUUM ANALYZE jobs;
CHECKPOINT;
