module GokiqSidecar
  # Turns a payload's class string into a job class without eval and without
  # instantiating anything. Each segment must look like a constant name and is
  # looked up with const_get(name, false) under the previous one, as Sidekiq's
  # processor does; the result must be a Sidekiq job class.
  class Resolver
    class InvalidClass < StandardError; end

    SEGMENT = /\A[A-Z][A-Za-z0-9_]*\z/.freeze
    AJ_WRAPPER = "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper".freeze
    # Sidekiq 8's name for the same wrapper. Mapped here rather than defined as
    # a constant: a `Sidekiq::ActiveJob` module would shadow `::ActiveJob`
    # for any code written inside `module Sidekiq`.
    ALIASES = {"Sidekiq::ActiveJob::Wrapper" => AJ_WRAPPER}.freeze

    def initialize(policy: JobPolicy.new)
      @policy = policy
    end

    # The class to run for a payload: a Sidekiq job class that the JobPolicy lets run; for the
    # ActiveJob wrapper, its job_class is checked too, before ActiveJob constantizes it.
    def runnable_class(job)
      klass = job_class(job["class"])
      wrapper?(klass) ? @policy.check_active_job!(job, self) : @policy.check_worker!(klass)
      klass
    end

    # The metric label of a runnable class: a real class name (the ActiveJob class for the
    # wrapper), never a payload's display_class, so a payload cannot mint labels.
    def self.label(klass, job)
      return klass.name.to_s unless klass.name == AJ_WRAPPER
      job["args"][0]["job_class"].delete_prefix("::")
    end

    # Any constant path; raises InvalidClass (message like NameError's).
    def constant(name)
      raise InvalidClass, "class name must be a non-empty string" unless name.is_a?(String) && !name.empty?
      path = name.delete_prefix("::")
      segments = path.split("::", -1)
      bad = segments.find { |s| !SEGMENT.match?(s) }
      raise InvalidClass, "invalid class name #{name.inspect}" if segments.empty? || bad
      segments.inject(Object) do |scope, segment|
        unless scope.is_a?(Module) && scope.const_defined?(segment, false)
          raise InvalidClass, "uninitialized constant #{name}"
        end
        scope.const_get(segment, false)
      end
    rescue NameError, LoadError => e
      # const_get may trigger autoload of a broken file
      raise InvalidClass, e.message
    end

    # A class that Sidekiq would run: includes Sidekiq::Worker (= Sidekiq::Job).
    def job_class(name)
      name = ALIASES.fetch(name, name)
      klass = constant(name)
      unless klass.is_a?(Class) && klass.include?(::Sidekiq::Worker)
        raise InvalidClass, "#{name} is not a Sidekiq job class"
      end
      klass
    end

    # Sidekiq 8.1 makes Rails' name a constant alias of Sidekiq::ActiveJob::Wrapper
    # (the class is then named after the latter); 7.3.9+ a subclass of it.
    def wrapper?(klass)
      klass.name == AJ_WRAPPER || ALIASES.key?(klass.name)
    end

    # The ActiveJob class inside a wrapper payload, or nil if it can't be loaded.
    def wrapped_class(job)
      name = job["wrapped"]
      name = job.dig("args", 0, "job_class") if !name.is_a?(String) && job["args"].is_a?(Array) && job["args"][0].is_a?(Hash)
      klass = constant(name)
      klass if defined?(::ActiveJob::Base) && klass.is_a?(Class) && klass < ::ActiveJob::Base
    rescue InvalidClass
      nil
    end

    # An exception class by name, for rebuilding a failure in /jobs/exhausted.
    def exception_class(name)
      klass = constant(name)
      klass if klass.is_a?(Class) && klass <= Exception
    rescue InvalidClass
      nil
    end
  end
end
