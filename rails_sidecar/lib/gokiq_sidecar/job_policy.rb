module GokiqSidecar
  # Which job classes the sidecar runs, beyond "is a Sidekiq job class". Whoever holds the
  # token, or can write to the app's Redis, chooses the class name, so a class that is a job
  # only in form must not be reachable:
  # - Sidekiq's delay extensions (Sidekiq::Extensions::DelayedClass, ...) YAML.load their
  #   argument and __send__ any method to any object: arbitrary Ruby;
  # - framework jobs (ActiveRecord::DestroyAssociationAsyncJob destroys any row it is given,
  #   ActiveStorage's purge jobs delete files, ...) are Rails' own plumbing, not the app's jobs.
  # Both are refused unless the allow-list names them. ActionMailer's delivery jobs
  # (deliver_later) run when their mailer is one of the app's own mailers and the method one of
  # its mail actions.
  #
  # The allow-list (GOKIQ_SIDECAR_ALLOW, comma-separated, and/or --allow-file, one per line,
  # # comments) holds class names ("Billing::InvoiceJob") and namespaces ("Billing::*"). When
  # it is not empty, only the classes it names run (ActiveJob: the job_class; a mailer job: its
  # mailer); it is also the only way to opt in to a framework class or a delay extension.
  class JobPolicy
    FRAMEWORK_NAMESPACES = %w[
      Sidekiq ActiveJob ActiveRecord ActiveStorage ActiveSupport ActiveModel ActionMailer
      ActionMailbox ActionText ActionCable ActionView ActionController ActionDispatch Rails
      GlobalID Turbo
    ].freeze
    MAILER_JOBS = %w[
      ActionMailer::MailDeliveryJob ActionMailer::DeliveryJob ActionMailer::Parameterized::DeliveryJob
    ].freeze
    DELIVERY_METHODS = %w[deliver_now deliver_now!].freeze

    def self.from(env_value, file = nil)
      entries = env_value.to_s.split(",")
      entries += File.readlines(file, chomp: true).map { |l| l.sub(/#.*/, "") } if file
      new(entries)
    end

    attr_reader :entries

    def initialize(entries = [])
      @entries = entries.map(&:strip).reject(&:empty?).map { |e| e.delete_prefix("::") }.uniq.freeze
      bad = @entries.reject { |e| e.match?(/\A[A-Z][A-Za-z0-9_]*(::[A-Z][A-Za-z0-9_]*)*(::\*)?\z/) }
      raise ArgumentError, "allow-list: not a class name or Namespace::* pattern: #{bad.join(", ")}" unless bad.empty?
    end

    # A Sidekiq job class (not the ActiveJob wrapper): raises Resolver::InvalidClass if refused.
    def check_worker!(klass)
      name = klass.name.to_s
      refuse!(name, "is not in the allow-list") unless permitted?(name)
    end

    # The ActiveJob class a wrapper payload names (job_class, and wrapped when given), checked
    # before ActiveJob constantizes and instantiates it.
    def check_active_job!(job, resolver)
      data = job["args"].is_a?(Array) ? job["args"][0] : nil
      name = data.is_a?(Hash) ? data["job_class"] : nil
      refuse!(name.inspect, "ActiveJob payload has no job_class") unless name.is_a?(String)
      name = name.delete_prefix("::")
      # Sidekiq's adapter writes the same name to both; `wrapped` chooses the hooks gokiq calls.
      wrapped = job["wrapped"]
      refuse!(wrapped.inspect, "differs from job_class #{name}") unless wrapped.nil? || wrapped.to_s.delete_prefix("::") == name
      klass = resolver.constant(name)
      refuse!(name, "is not an ActiveJob class") unless defined?(::ActiveJob::Base) && klass.is_a?(Class) && klass < ::ActiveJob::Base
      if MAILER_JOBS.include?(name) && !explicitly_allowed?(name)
        check_mail_delivery!(data["arguments"], resolver)
      elsif !permitted?(name)
        refuse!(name, "is not in the allow-list")
      end
    end

    private

    # deliver_later: arguments are [mailer name, mail method, delivery method, ...].
    # MailDeliveryJob does mailer.constantize.public_send(method).send(delivery): with a free
    # choice of either, any public class method (class_eval) is reachable.
    def check_mail_delivery!(arguments, resolver)
      mailer_name, method, delivery = arguments.is_a?(Array) ? arguments : []
      refuse!(mailer_name.inspect, "is not a mailer") unless mailer_name.is_a?(String)
      mailer = resolver.constant(mailer_name)
      unless defined?(::ActionMailer::Base) && mailer.is_a?(Class) && mailer < ::ActionMailer::Base
        refuse!(mailer_name, "is not an ActionMailer class")
      end
      refuse!(mailer_name, "is not in the allow-list") unless permitted?(mailer.name.to_s)
      refuse!("#{mailer_name}.#{method}", "is not a mail action") unless method.is_a?(String) && mailer.action_methods.include?(method)
      refuse!(delivery.inspect, "is not a delivery method") unless DELIVERY_METHODS.include?(delivery)
    end

    def permitted?(name)
      return explicitly_allowed?(name) if framework?(name) || !@entries.empty?
      true
    end

    def framework?(name)
      FRAMEWORK_NAMESPACES.include?(name.split("::", 2).first)
    end

    def explicitly_allowed?(name)
      @entries.any? { |e| e.end_with?("::*") ? name.start_with?(e.delete_suffix("*")) : name == e }
    end

    def refuse!(name, why)
      raise Resolver::InvalidClass, "#{name} #{why}: refused by gokiq-sidecar (see GOKIQ_SIDECAR_ALLOW)"
    end
  end
end
