"""Recurring schedules: a cron expression and a timezone that turn a workflow into a job at every fire time."""
