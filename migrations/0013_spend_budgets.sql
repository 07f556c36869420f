-- Budgets over a window: what a channel may spend per day and per month (USD, as its agents
-- report it), in the scheduler's time zone. NULL: `[budget] daily_max_cost_usd` and
-- `monthly_max_cost_usd`. A channel whose spend in the current window reached its budget has
-- its queued jobs held (the claim skips the channel) until the window ends or the budget is
-- raised; nothing is lost. 0 holds every job of the channel.
ALTER TABLE channels ADD COLUMN budget_day_usd REAL
    CHECK (budget_day_usd IS NULL OR budget_day_usd >= 0);
ALTER TABLE channels ADD COLUMN budget_month_usd REAL
    CHECK (budget_month_usd IS NULL OR budget_month_usd >= 0);

-- A channel's spend since a window's start is summed from the index alone.
DROP INDEX usage_channel_at;
CREATE INDEX usage_channel_at ON usage (channel_id, at, cost_usd);
