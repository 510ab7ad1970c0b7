"""CPU cost of recording sync deliveries: 20,000 records through the engine into deliveries.db.

    python3 bench/record.py DIR_HOLDING_moxxy_webhooks.py

Prints the microseconds per record on the caller's thread, the CPU in all (the writer thread too)
and the wall time until the last record is on disk (bench/RESULTS.md).
"""
import sys, time, tempfile, os
sys.path.insert(0, sys.argv[1])
import moxxy_webhooks as mw
d = tempfile.mkdtemp()
log = mw.DeliveryLog(os.path.join(d, "deliveries.db"))
log.start()
eng = mw.DeliveryEngine(lambda o: log, lambda: None, mw.Options(), mw.Metrics())
eng.store = log
N = 20000
t0, c0 = time.perf_counter(), time.process_time()
for i in range(N):
    did = mw.new_id()
    eng.record(id=did, webhook="generic", agent="default", status="succeeded", attempts=1, event=None,
               response="Process this data", finished_at=mw.clock())
t1 = time.perf_counter()
log.stop()
t2, c2 = time.perf_counter(), time.process_time()
print(f"caller {(t1-t0)/N*1e6:.1f} us/record; total CPU incl. writer {(c2-c0)/N*1e6:.1f} us/record; wall to disk {(t2-t0)/N*1e6:.1f} us")
