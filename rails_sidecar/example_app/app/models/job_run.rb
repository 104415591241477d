# One row per job run (see db/schema.rb). `args` holds JSON.
class JobRun < ApplicationRecord
  def self.record!(job_class:, jid:, args: nil, note: nil)
    create!(job_class: job_class, jid: jid, note: note,
            args: args.nil? ? nil : JSON.generate(args),
            middleware: ExampleServerMiddleware.active?)
  end

  def parsed_args
    args && JSON.parse(args)
  end
end
