# gokiq-sidecar: runs a Rails app's Sidekiq jobs on behalf of gokiq's Celery
# workers, over HTTP. Loading this file does not boot Rails (see Boot).
module GokiqSidecar
  VERSION = "0.1.0"
  # Where every sidecar writes the app's Sidekiq::VERSION in Sidekiq's Redis
  # after boot, so gokiq's bridge and workers learn the app's major version
  # (gokiq_celery's `sidekiq_version = auto`). The Python side reads this name.
  SIDEKIQ_VERSION_KEY = "gokiq:sidekiq_version"
end

require "gokiq_sidecar/json_logger"
require "gokiq_sidecar/metrics"
require "gokiq_sidecar/auth"
require "gokiq_sidecar/state"
require "gokiq_sidecar/sidekiq_config"
require "gokiq_sidecar/lifecycle"
require "gokiq_sidecar/job_policy"
require "gokiq_sidecar/resolver"
require "gokiq_sidecar/job_catalog"
require "gokiq_sidecar/runner"
require "gokiq_sidecar/app"
require "gokiq_sidecar/cron"
