require_relative "test_helper"
require_relative "probe_jobs"
require "action_mailer"

# GET /classes: the job classes gokiq-api accepts submissions for, exactly those the sidecar
# would run.
class ClassesTest < Minitest::Test
  include SidecarTestHelpers

  WRAPPER = "ActiveJob::QueueAdapters::SidekiqAdapter::JobWrapper".freeze

  def get_classes(auth = true)
    auth ? authed : header("Authorization", nil)
    get "/classes"
  end

  def listed
    json["classes"].to_h { |c| [c["class"], c] }
  end

  def test_needs_the_token_and_a_booted_app
    get_classes(false)
    assert_equal 401, last_response.status
    header "Authorization", "Bearer wrong"
    get "/classes"
    assert_equal 401, last_response.status
    @state = GokiqSidecar::State.new(:booting)
    with_allow
    get_classes
    assert_equal 503, last_response.status
    post_json("/classes", {})
    assert_equal 405, last_response.status
  end

  def test_sidekiq_classes_with_their_queue_and_options
    get_classes
    assert_equal 200, last_response.status, last_response.body
    assert_equal "application/json", last_response.headers["Content-Type"]
    assert_equal Sidekiq::VERSION, json["sidekiq_version"]
    assert_equal Rails.version, json["rails_version"]
    hard = listed.fetch("HardJob")
    assert_equal({"class" => "HardJob", "kind" => "sidekiq", "queue" => "default",
                  "sidekiq_options" => HardJob.get_sidekiq_options}, hard)
    assert_equal %w[retry queue], hard["sidekiq_options"].keys, "Sidekiq's order, for the payload"
    fail_job = listed.fetch("FailJob")
    assert_equal({"retry" => 2, "queue" => "default", "backtrace" => 5}, fail_job["sidekiq_options"])
    assert_equal false, listed.fetch("NoRetryJob")["sidekiq_options"]["retry"]
    assert listed.key?("Namespaced::InnerJob")
  end

  def test_active_job_classes_and_how_they_are_wrapped
    get_classes
    greet = listed.fetch("GreetJob")
    assert_equal "active_job", greet["kind"]
    assert_equal "default", greet["queue"]
    assert_nil greet["priority"]
    assert_equal({"retry" => 4, "queue" => "default"}, listed.fetch("AjRetryJob")["sidekiq_options"])
    context = json["active_job"]
    assert_equal WRAPPER, context["wrapper"]
    assert_equal({"retry" => true, "queue" => "default"}, context["wrapper_options"])
    assert_equal I18n.locale.to_s, context["locale"]
    assert_equal Time.zone.name, context["timezone"]
  end

  def test_lists_only_what_the_sidecar_would_run
    anonymous = Class.new do
      include Sidekiq::Worker
      def perform; end
    end
    get_classes
    names = listed.keys
    refute_includes names, WRAPPER, "the wrapper is not a job of the app"
    refute_includes names, "ApplicationJob", "abstract: ActiveJob's own perform"
    refute_includes names, "NotAJob"
    refute(names.any? { |n| n.start_with?("Sidekiq::", "ActiveRecord::", "ActiveStorage::", "ActionMailer::") },
           "framework classes: #{names.grep(/::/).inspect}")
    refute(names.any?(&:nil?))
    refute_includes listed.values, anonymous
    # Each listed class is one /jobs/execute resolves and the policy lets run.
    resolver = GokiqSidecar::Resolver.new
    json["classes"].select { |c| c["kind"] == "sidekiq" }.each do |c|
      assert_equal c["class"], resolver.runnable_class("class" => c["class"], "args" => []).name
    end
  end

  def test_the_allow_list_narrows_it
    with_allow("HardJob", "GreetJob", "Sidekiq::Extensions::*")
    get_classes
    assert_equal 200, last_response.status
    names = listed.keys
    assert_equal %w[GreetJob HardJob], names - names.grep(/\ASidekiq::Extensions::/)
    assert ActionMailer::MailDeliveryJob # loaded, as a Rails app with mailers has it
    with_allow("ActionMailer::MailDeliveryJob")
    get_classes
    assert_equal %w[ActionMailer::MailDeliveryJob], listed.keys
  end
end
