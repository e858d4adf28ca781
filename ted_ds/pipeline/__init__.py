"""The pipeline-parallel teacher (``teacher.placement: pipeline``): each rank holds one pipeline
stage, about 1/P of the teacher, so a teacher too large for one rank runs without ZeRO-3's gathers.

``layout`` says which blocks and taps each pipeline stage holds, ``stage`` builds one out of the HF
model, ``messages`` names what pipeline stages send each other and the one order they send it in,
``schedule`` runs a call."""
