require_relative "test_helper"
require_relative "probe_jobs"
require "yaml"
# The real classes an attacker would name: Sidekiq 6.4's delay extensions (loaded by
# Sidekiq::Extensions.enable_delay!, here directly) and Rails 6.1's framework jobs.
require "sidekiq/extensions/class_methods"
require "sidekiq/extensions/active_record"
require "sidekiq/extensions/action_mailer"
require "action_mailer"

ActionMailer::Base.delivery_method = :test

# An app's own mailer, as deliver_later would name it.
class ProbeMailer < ActionMailer::Base
  def hello(to)
    mail(to: to, from: "app@example.com", subject: "hello", body: "hi")
  end
end

# Counts instantiations: ActiveJob's deserialize runs `job_class.constantize.new`.
class NewCounter
  class << self
    attr_accessor :count
  end
  self.count = 0

  def initialize(*)
    self.class.count += 1
  end
end

module Billing
  class InvoiceJob
    include Sidekiq::Worker
    def perform; end
  end
end

# Whoever holds the token (or writes to the app's Redis) names the class: nothing that is a
# job only in form may run.
class AttackSurfaceTest < Minitest::Test
  include SidecarTestHelpers

  WRAPPER = "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper".freeze

  def setup
    @marker = File.join(TEST_TMP, "pwned-#{SecureRandom.hex(4)}")
    ActionMailer::Base.deliveries.clear
  end

  def assert_refused(payload)
    execute(payload.merge("jid" => new_jid))
    assert_equal 422, last_response.status, last_response.body
    assert_equal "invalid_class", json["status"]
    assert_equal "NameError", json["error_class"]
    refute File.exist?(@marker), "refused code ran"
  end

  # Psych 4's YAML.load takes only plain types, but a String target is enough:
  # "x".__send__("instance_eval", code) runs any Ruby.
  def delayed(klass, code)
    {"class" => "Sidekiq::Extensions::#{klass}", "args" => [YAML.dump(["x", "instance_eval", [code]])]}
  end

  def write_marker(text = "x")
    "File.write(#{@marker.inspect}, #{text.inspect})"
  end

  # What ActiveJob's Sidekiq adapter enqueues for `job` (the real serialization).
  def active_job(job)
    data = JSON.parse(JSON.generate(job.serialize))
    {"class" => WRAPPER, "wrapped" => data["job_class"], "queue" => "default", "args" => [data]}
  end

  # What ProbeMailer.hello(to).deliver_later enqueues in Rails 6.1.
  def mail_job(to)
    ActionMailer::MailDeliveryJob.new("ProbeMailer", "hello", "deliver_now", args: [to])
  end

  def test_delay_extensions_are_refused_by_default
    assert_refused(delayed("DelayedClass", write_marker))
    assert_refused(delayed("DelayedModel", write_marker))
    assert_refused(delayed("DelayedMailer", write_marker))
    assert_match(/refused by gokiq-sidecar/, json["error_message"])
  end

  def test_delay_extensions_run_once_the_app_opts_in
    with_allow("Sidekiq::Extensions::DelayedClass")
    execute(delayed("DelayedClass", write_marker("ran")).merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
    assert_equal "ran", File.read(@marker)
    File.delete(@marker)
    assert_refused(delayed("DelayedModel", write_marker))
  end

  def test_destroy_association_async_job_cannot_destroy_rows
    victim = Person.create!(name: "victim")
    job = ActiveRecord::DestroyAssociationAsyncJob.new(
      owner_model_name: "Person", owner_id: -1, association_class: "Person",
      association_ids: [victim.id], association_primary_key_column: "id"
    )
    assert_refused(active_job(job))
    assert Person.exists?(victim.id), "row destroyed"
    with_allow("ActiveRecord::DestroyAssociationAsyncJob") # an explicit opt-in runs it
    execute(active_job(job).merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
    refute Person.exists?(victim.id)
  end

  def test_job_class_is_checked_before_active_job_instantiates_it
    NewCounter.count = 0
    %w[NewCounter Kernel Logger ActiveRecord::Base Object HardJob Nope].each do |name|
      assert_refused("class" => WRAPPER, "args" => [{"job_class" => name, "arguments" => []}])
    end
    assert_equal 0, NewCounter.count
    assert_refused("class" => WRAPPER, "args" => [])
    assert_refused("class" => WRAPPER, "args" => ["GreetJob"])
    # `wrapped` picks the hooks gokiq calls: it must name the same class.
    greet = active_job(GreetJob.new(Person.create!(name: "Ann"), greeting: "Hi"))
    assert_refused(greet.merge("wrapped" => "FailJob"))
    execute(greet.merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
  end

  def test_deliver_later_runs_for_the_apps_own_mailer_actions_only
    execute(active_job(mail_job("ann@example.com")).merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
    assert_equal ["ann@example.com"], ActionMailer::Base.deliveries.map(&:to).flatten

    code = "File.write(#{@marker.inspect}, 'x')"
    mail = ->(*arguments) { {"class" => WRAPPER, "args" => [{"job_class" => "ActionMailer::MailDeliveryJob", "arguments" => arguments}]} }
    assert_refused(mail.call("ProbeMailer", "class_eval", "deliver_now", {"args" => [code], "_aj_ruby2_keywords" => ["args"]}))
    assert_refused(mail.call("ProbeMailer", "hello", "instance_eval", {"args" => ["a@b"], "_aj_ruby2_keywords" => ["args"]}))
    assert_refused(mail.call("ActionMailer::Base", "hello", "deliver_now", {"args" => ["a@b"], "_aj_ruby2_keywords" => ["args"]}))
    assert_refused(mail.call("Person", "hello", "deliver_now", {"args" => ["a@b"], "_aj_ruby2_keywords" => ["args"]}))
    assert_refused(mail.call(42))
    assert_equal 1, ActionMailer::Base.deliveries.size
  end

  def test_allow_list_names_classes_and_namespaces
    with_allow("Billing::*", "GreetJob")
    execute("class" => "Billing::InvoiceJob", "args" => [], "jid" => new_jid)
    assert_equal 200, last_response.status, last_response.body
    execute(active_job(GreetJob.new(Person.create!(name: "Bo"), greeting: "Hi")).merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
    assert_refused("class" => "HardJob", "args" => [])
    with_allow("ProbeMailer")
    execute(active_job(mail_job("c@example.com")).merge("jid" => new_jid))
    assert_equal 200, last_response.status, last_response.body
  end

  def test_allow_list_from_env_and_file
    file = File.join(TEST_TMP, "allow.txt")
    File.write(file, "# billing\nBilling::*\n\nHardJob # the old one\n")
    policy = GokiqSidecar::JobPolicy.from("NoopJob, ::GreetJob", file)
    assert_equal %w[NoopJob GreetJob Billing::* HardJob], policy.entries
    assert_raises(ArgumentError) { GokiqSidecar::JobPolicy.new(["Billing::"]) }
    assert_raises(ArgumentError) { GokiqSidecar::JobPolicy.new(["*"]) }
  end

  def test_exhausted_hooks_of_a_refused_class_do_not_run
    post_json("/jobs/exhausted", {"job" => delayed("DelayedClass", write_marker).merge("jid" => new_jid),
                                  "error_class" => "RuntimeError", "error_message" => "x", "run_hook" => true,
                                  "death_handlers" => false})
    assert_equal 200, last_response.status
    assert_equal false, json["hook_ran"]
  end

  # --- metric labels: real classes only ----------------------------------------

  def test_metric_labels_are_resolved_classes_not_display_class
    3.times { |i| execute("class" => "NoopJob", "args" => [], "display_class" => "spam-#{i}", "jid" => new_jid) }
    execute(active_job(GreetJob.new(Person.create!(name: "Cy"), greeting: "Hi")).merge("display_class" => "spam-aj", "jid" => new_jid))
    post_json("/jobs/exhausted", {"job" => {"class" => "Nope", "args" => [], "display_class" => "spam-x", "jid" => new_jid}})
    post_json("/jobs/exhausted", {"job" => {"class" => "FailJob", "args" => [], "display_class" => "spam-y", "jid" => new_jid}})
    get "/metrics"
    body = last_response.body
    refute_includes body, "spam"
    assert_includes body, %(gokiq_sidecar_jobs_total{class="NoopJob",outcome="ok"} 3)
    assert_includes body, %(gokiq_sidecar_jobs_total{class="GreetJob",outcome="ok"} 1)
    assert_includes body, %(gokiq_sidecar_exhausted_total{class="(invalid)"} 1)
    assert_includes body, %(gokiq_sidecar_exhausted_total{class="FailJob"} 1)
  end

  def test_metric_class_labels_are_capped
    metrics = GokiqSidecar::Metrics.new
    (GokiqSidecar::Metrics::MAX_CLASSES + 100).times { |i| metrics.job_rejected("Class#{i}", "duplicate") }
    labels = metrics.to_prometheus.scan(/class="([^"]+)"/).flatten.uniq
    assert_equal GokiqSidecar::Metrics::MAX_CLASSES + 1, labels.size
    assert_includes labels, "(other)"
  end
end
