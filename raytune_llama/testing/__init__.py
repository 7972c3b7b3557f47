"""Test tooling shipped with the package so that the chaos tests, `bench/chaos_report.py` and an
operator on a real cluster can use it: fault injection (fault_injection.py). Nothing in the
training path imports it unless a fault is asked for (RAYTUNE_LLAMA_STALL on the driver)."""
