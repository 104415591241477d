# A deliberately small Rails 6.1 app: only the frameworks the demo jobs need,
# and no Gemfile, so it boots from the Debian-installed gems without Bundler.
require "rails"
require "active_record/railtie"
require "active_job/railtie"
require "sidekiq"
# Periodic jobs (config/initializers/cron.rb). In server mode the gem hooks its poller into
# Sidekiq's launcher; gokiq-sidecar runs that poller too (lib/gokiq_sidecar/cron.rb).
# Debian's sidekiq-cron 1.8 runs on Sidekiq 6 only (it reads redis-rb's gem version, and
# Sidekiq 7 talks to Redis through redis-client): on 7+ the example app has no periodic jobs.
require "sidekiq-cron" if Sidekiq::VERSION.start_with?("6.")

module ExampleApp
  class Application < Rails::Application
    config.load_defaults 6.1
    config.root = File.expand_path("..", __dir__)

    # One configuration for every environment: the app is a test fixture, and
    # the sidecar wants classes loaded once, up front.
    config.cache_classes = true
    config.eager_load = true
    config.active_job.queue_adapter = :sidekiq
    config.secret_key_base = ENV.fetch("SECRET_KEY_BASE", "example-app-not-secret")

    # stdout belongs to the sidecar's JSON job log; Rails' own chatter goes to stderr.
    config.logger = ActiveSupport::Logger.new($stderr)
    config.log_level = ENV.fetch("RAILS_LOG_LEVEL", "warn").to_sym
  end
end
