# gokiq-sidecar: runs a Rails app's Sidekiq jobs on behalf of gokiq's Celery
# workers, over HTTP. Loading this file does not boot Rails (see Boot).
module GokiqSidecar
  VERSION = "0.1.0"
end

require "gokiq_sidecar/json_logger"
require "gokiq_sidecar/metrics"
require "gokiq_sidecar/auth"
require "gokiq_sidecar/state"
require "gokiq_sidecar/job_policy"
require "gokiq_sidecar/resolver"
require "gokiq_sidecar/runner"
require "gokiq_sidecar/app"
