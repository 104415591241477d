class FlakyAttempt < ApplicationRecord
end
