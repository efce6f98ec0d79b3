-- The read models live in their own database, as in the reference's environment.
CREATE DATABASE queries;
