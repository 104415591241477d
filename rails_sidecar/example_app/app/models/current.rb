class Current < ActiveSupport::CurrentAttributes
  attribute :user_id
end
