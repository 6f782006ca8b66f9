-- Sections are ranked in Python inside the few documents search has already chosen (context.py). A second
-- full-text index over every body cost half of each import and a third of the database for that.
DROP TRIGGER sections_ai;
DROP TRIGGER sections_ad;
DROP TABLE sections_fts;
DROP VIEW section_texts;
