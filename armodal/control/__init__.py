"""Control: scripted experts, environment rollouts, the closed-loop policy runner and its
evaluation."""
