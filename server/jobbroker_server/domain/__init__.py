"""Pure broker logic: job states, retry policy, models and errors. No I/O."""
