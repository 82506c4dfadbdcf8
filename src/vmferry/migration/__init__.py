"""vmferry.migration: live migration and snapshots.

saver.py the Saver/Loader contract; ram.py and device_state.py the two kinds of state today;
source_session.py / dest_session.py the protocol (sans-I/O); source.py / destination.py /
return_path.py the threads and channels around it; convergence.py, stats.py, state.py the
numbers and the QMP state machine; params.py the QMP parameters and capabilities.
"""
