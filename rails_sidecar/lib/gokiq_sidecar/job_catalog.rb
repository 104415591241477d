require "json"

module GokiqSidecar
  # The app's job classes as `GET /classes` reports them to gokiq-api, which validates
  # submissions against them: each Sidekiq job class and each ActiveJob class that this sidecar
  # would run (the same Resolver and JobPolicy as /jobs/execute), with its queue and its
  # sidekiq_options. Built on each call from the loaded classes (the app is eager-loaded at
  # boot), so it never goes stale inside one process.
  class JobCatalog
    def initialize(resolver:, policy:)
      @resolver = resolver
      @policy = policy
    end

    def to_h
      {
        "sidekiq_version" => ::Sidekiq::VERSION,
        "rails_version" => (::Rails.version if defined?(::Rails)),
        "active_job" => active_job_context,
        "classes" => (sidekiq_classes + active_job_classes).sort_by { |c| c["class"] }
      }
    end

    private

    def sidekiq_classes
      ObjectSpace.each_object(Class).filter_map do |klass|
        next unless klass.include?(::Sidekiq::Worker) && runnable_worker?(klass)
        options = json_safe(klass.get_sidekiq_options)
        {"class" => klass.name, "kind" => "sidekiq", "queue" => options["queue"].to_s,
         "sidekiq_options" => options}
      end
    end

    def runnable_worker?(klass)
      return false unless klass.name && klass.method_defined?(:perform) && reachable?(klass)
      return false if @resolver.wrapper?(klass)
      @policy.check_worker!(klass)
      true
    rescue Resolver::InvalidClass
      false
    end

    def active_job_classes
      return [] unless defined?(::ActiveJob::Base)
      ::ActiveJob::Base.descendants.filter_map do |klass|
        next unless klass.name && concrete_active_job?(klass) && reachable?(klass) && allowed_active_job?(klass)
        {"class" => klass.name, "kind" => "active_job", "queue" => static(klass.queue_name),
         "priority" => static(klass.priority),
         "sidekiq_options" => json_safe(klass.respond_to?(:get_sidekiq_options) ? klass.get_sidekiq_options : {})}
      end
    end

    # ApplicationJob and other abstract parents only have ActiveJob's perform, which raises.
    def concrete_active_job?(klass)
      klass.instance_method(:perform).owner != ::ActiveJob::Execution
    end

    # Asked as /jobs/execute asks it, for a payload that names this class: a mailer's delivery
    # job is listed only when the allow-list names it (else its arguments decide, at run time).
    def allowed_active_job?(klass)
      payload = {"class" => Resolver::AJ_WRAPPER, "wrapped" => klass.name,
                 "args" => [{"job_class" => klass.name, "arguments" => []}]}
      @policy.check_active_job!(payload, @resolver)
      true
    rescue Resolver::InvalidClass
      false
    end

    # Only a class its own name leads back to (not an anonymous or a replaced one).
    def reachable?(klass)
      @resolver.constant(klass.name).equal?(klass)
    rescue Resolver::InvalidClass
      false
    end

    def active_job_context
      return nil unless defined?(::ActiveJob::Base)
      {"wrapper" => Resolver::AJ_WRAPPER,
       "wrapper_options" => json_safe(wrapper_class.get_sidekiq_options),
       "locale" => (defined?(::I18n) ? ::I18n.locale.to_s : "en"),
       "timezone" => (::Time.zone&.name if ::Time.respond_to?(:zone))}
    end

    def wrapper_class
      @resolver.job_class(Resolver::AJ_WRAPPER)
    end

    # A queue or priority given as a block is decided per job: not reportable.
    def static(value)
      value.is_a?(Proc) ? nil : json_safe(value)
    end

    # What JSON carries unchanged; anything else (a connection pool, a proc) is left out.
    def json_safe(value)
      case value
      when Hash then value.each_with_object({}) { |(k, v), h| (s = json_safe(v)) == :skip || (h[k.to_s] = s) }
      when Array then value.map { |v| json_safe(v) }.reject { |v| v == :skip }
      when String, Integer, true, false, nil then value
      when Float then value.finite? ? value : :skip
      when Symbol then value.to_s
      else :skip
      end
    end
  end
end
