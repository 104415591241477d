# ActiveJob with a GlobalID argument and keyword arguments.
class GreetJob < ApplicationJob
  queue_as :default

  def perform(person, greeting:, punctuation: "!")
    JobRun.record!(job_class: "GreetJob", jid: provider_job_id,
                   note: "#{greeting}, #{person.name}#{punctuation}")
  end
end
