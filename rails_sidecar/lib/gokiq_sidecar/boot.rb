module GokiqSidecar
  # Loads the Rails app the way `sidekiq -r .` does, so the app cannot tell
  # the difference: Sidekiq in server mode, then config/environment.rb, then
  # every class eager-loaded (job classes must resolve by name, and loading
  # code once up front keeps threads from autoloading concurrently).
  module Boot
    # Must run before any gem is activated, so a Gemfile's versions win.
    def self.bundler(root)
      gemfile = File.join(root, "Gemfile")
      return false unless File.exist?(gemfile)
      ENV["BUNDLE_GEMFILE"] ||= gemfile
      require "bundler/setup"
      true
    end

    # Cheap requires, done before Puma listens.
    def self.frameworks
      require "rails"
      require "sidekiq"
      # Sidekiq 6.4 decides server mode with `defined?(Sidekiq::CLI)`; the
      # app's Sidekiq.configure_server blocks (middleware, death handlers,
      # reloader) only run when this is loaded before the app. It also loads
      # sidekiq/job_retry, whose Skip the runner rescues.
      require "sidekiq/cli"
      # sidekiq.rb only loads its Rails engine when Rails was loaded first.
      require "sidekiq/rails"
      # stdout is the sidecar's JSON job log. Sidekiq's text logger (which the
      # engine also makes Rails.logger broadcast to) goes to stderr instead.
      require "gokiq_sidecar/sidekiq_config"
      SidekiqConfig.current.log_to($stderr)
    end

    def self.application(root)
      frameworks
      require File.join(root, "config", "environment")
      ::Rails.application.eager_load! unless ::Rails.application.config.eager_load
    end
  end
end
