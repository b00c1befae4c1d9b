"""Fault-injection toolkit (see testing/README.md).

* ``fixtures``: the pytest plugin (hub, daemons, VMMs, fault proxies, seeds, leak guard)
* ``proxy``: channel faults on any msixhub connection, frame by frame, fds passed along
* ``faults``: process faults (kill, stop/continue, restart) and resource faults (routes,
  fds, image writes); ``limited``: run a command under lowered resource limits
* ``processes``: hub, daemons and other processes started for real; ``vmm_process``: a VMM
  as a process; ``inprocess``: a hub and a testdev inside the test's own trio run
* ``fuzz`` (and ``fuzz_atheris``): fuzzing the hub's message handling
* ``seeds``: the run's seed and each test's
* ``system``: a whole hub + testdev + VMM system, and the guest's driver for testdev
"""
