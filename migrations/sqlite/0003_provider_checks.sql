-- What the runner did not take from the provider at face value.
--   usage_flag: why the call's reported usage or cost was impossible (negative or fractional
--               token counts, more tokens than the request could hold, an absurd usage.cost);
--               such a call is costed at its reservation (cost_source = 'estimate').
--   repair:     how a nearly-right answer was repaired before validation (raw control
--               characters in strings, trailing commas, prose around the object).
ALTER TABLE backfill_calls ADD COLUMN usage_flag TEXT;
ALTER TABLE backfill_calls ADD COLUMN repair TEXT;
